//! Builds the guest device functions in `examples/` from source, as Wasmtime's
//! `crates/test-programs` does, and tells this crate where they are.
//!
//! The examples are their own Cargo workspace (they target Wasm, with their own profile and
//! lock file). This script runs the `cargo` it was given on them, with a target directory
//! under `OUT_DIR`, and sets one `LICHEN_GUEST_*` environment variable per guest to the
//! absolute path of its `.wasm` file: `src/lib.rs` turns them into constants. Only tests and
//! benchmarks depend on this crate, so building the node (`cargo build -p lichen`) builds no
//! guest.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Component guests: (package, environment variable). Built for `wasm32-wasip2`, which makes
/// a component directly.
const COMPONENTS: &[(&str, &str)] = &[
    ("counter", "LICHEN_GUEST_COUNTER"),
    ("thermostat", "LICHEN_GUEST_THERMOSTAT"),
    ("misbehave", "LICHEN_GUEST_MISBEHAVE"),
    ("blinky", "LICHEN_GUEST_BLINKY"),
    ("adc-sampler", "LICHEN_GUEST_ADC_SAMPLER"),
    ("env-sensor", "LICHEN_GUEST_ENV_SENSOR"),
    ("button-led", "LICHEN_GUEST_BUTTON_LED"),
];

/// Plain WASI preview-1 command guests, built for `wasm32-wasip1`.
const COMMANDS: &[(&str, &str)] = &[("hello-wasi", "LICHEN_GUEST_HELLO_WASI")];

/// The same command programs built for `wasm32-wasip2`, where a binary becomes a component
/// exporting `wasi:cli/run` (what Kubernetes users bring in a Wasm pod).
const CLI_COMMANDS: &[(&str, &str)] = &[("hello-wasi", "LICHEN_GUEST_HELLO_WASI_CLI")];

/// Variables of the outer build that must not reach the inner one: they would apply host
/// flags, the host target, the outer target directory or a lint driver (clippy) to the guests,
/// or (those cargo sets only for some crates) describe this crate to a guest crate.
const LEAKY_VARS: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_LINKS",
    "OUT_DIR",
];

/// Prefixes of variables cargo sets for this build script that describe the outer target or
/// package (`CARGO_CFG_UNIX`, `CARGO_FEATURE_*`, ...); an inner build script must not see them.
const LEAKY_PREFIXES: &[&str] = &["CARGO_CFG_", "CARGO_FEATURE_", "DEP_"];

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let repo = manifest_dir
        .parent()
        .expect("the test-programs crate lives one level below the repository root");
    let examples = repo.join("examples");
    let target_dir = PathBuf::from(env_var("OUT_DIR")).join("guests");

    rerun_if_changed(&examples, repo);

    let components: Vec<&str> = COMPONENTS
        .iter()
        .chain(CLI_COMMANDS)
        .map(|(package, _)| *package)
        .collect();
    let commands: Vec<&str> = COMMANDS.iter().map(|(package, _)| *package).collect();
    cargo_build(&examples, &target_dir, "wasm32-wasip2", &components);
    cargo_build(&examples, &target_dir, "wasm32-wasip1", &commands);

    for (target, guests, library) in [
        ("wasm32-wasip2", COMPONENTS, true),
        ("wasm32-wasip2", CLI_COMMANDS, false),
        ("wasm32-wasip1", COMMANDS, false),
    ] {
        for (package, var) in guests {
            // A library's file name has `_` for `-`; a binary's keeps the package name.
            let file = if library {
                package.replace('-', "_")
            } else {
                package.to_string()
            };
            let wasm = target_dir
                .join(target)
                .join("release")
                .join(format!("{file}.wasm"));
            assert!(
                wasm.is_file(),
                "guest {package} was built but {} is missing",
                wasm.display()
            );
            println!("cargo:rustc-env={var}={}", wasm.display());
        }
    }
}

/// Asks cargo to run this script again only when a guest's source or the WIT changes.
fn rerun_if_changed(examples: &Path, repo: &Path) {
    let mut paths = vec![
        examples.join("Cargo.toml"),
        examples.join("Cargo.lock"),
        repo.join("host-apis").join("wit"),
    ];
    for (package, _) in COMPONENTS.iter().chain(COMMANDS).chain(CLI_COMMANDS) {
        paths.push(examples.join(package).join("Cargo.toml"));
        paths.push(examples.join(package).join("src"));
    }
    for path in paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// Runs `cargo build --release --locked` on `packages` of the examples workspace.
fn cargo_build(examples: &Path, target_dir: &Path, target: &str, packages: &[&str]) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(examples)
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--target")
        .arg(target)
        .arg("--manifest-path")
        .arg(examples.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    for package in packages {
        command.arg("-p").arg(package);
    }
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if LEAKY_VARS.contains(&name) || LEAKY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            command.env_remove(name);
        }
    }

    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest device functions: {e}"));
    if output.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing_target = stderr.contains("target may not be installed")
        || stderr.contains("can't find crate for `std`")
        || stderr.contains("can't find crate for `core`");
    if missing_target {
        panic!(
            "the Rust target {target} is not installed, and the guest device functions in \
             examples/ need it; run: rustup target add wasm32-wasip2 wasm32-wasip1\n\n{stderr}"
        );
    }
    panic!(
        "building the guest device functions ({}) for {target} failed ({}); \
         to reproduce: cd examples && cargo build --release --target {target} -p {}\n\n{stderr}",
        packages.join(", "),
        output.status,
        packages.join(" -p "),
    );
}

fn env_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}
