//! `size`: the size of the running binary and of each node flavour's static release
//! binaries, where built. Cargo's target directory is found as `lichen_agent::util` finds it
//! ($CARGO_TARGET_DIR, or the directory above the running binary that cargo tagged); the full
//! node's release is `<target dir>/<triple>/release/lichen` and the small node's
//! `<target dir>/<triple>/small/lichen` (`--profile small`). A foreign binary cannot be run
//! here, so its flavour is read from the version text it carries (`0.1.0 (small node)`); a
//! developer's build with the operator's tool and benches says `0.1.0 (full node; operator,
//! bench)` and is not counted as the shipped full node.

use anyhow::{Context, Result};

use super::Table;

/// The shipped targets.
const TARGETS: [&str; 3] = [
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
    "riscv64gc-unknown-linux-gnu",
];

/// One node flavour: its name (as `lichen --version` prints it), the cargo profile and
/// command that build it, and the target for its size.
struct Flavour {
    name: &'static str,
    profile: &'static str,
    build: &'static str,
    target: &'static str,
    limit_bytes: u64,
}

const FLAVOURS: [Flavour; 2] = [
    Flavour {
        name: "full node",
        profile: "release",
        build: "cargo build --release -p lichen --no-default-features --features full-node --target <triple>",
        target: "<= 12 MB",
        limit_bytes: 12_000_000,
    },
    Flavour {
        name: "small node",
        profile: "small",
        build: "cargo build --profile small -p lichen --no-default-features --features small-node --target <triple>",
        target: "<= 6 MB",
        limit_bytes: 6_000_000,
    },
];

const REFERENCE: &str = "Wasmtime runtime alone 0.9 MB; + WASI 2.4 MB; + Cranelift 7 MB";

/// The largest file read to find its flavour; a `lichen` is far smaller.
const MAX_BINARY_BYTES: u64 = 256 << 20;

/// `12.3 MB (11.7 MiB)`.
fn fmt_size(bytes: u64) -> String {
    format!(
        "{:.1} MB ({})",
        bytes as f64 / 1e6,
        lichen_agent::util::human_bytes(bytes)
    )
}

/// What a built binary at `path` is: `Ok(Some(size))` when it is `flavour`'s, `Ok(None)`
/// when it is absent, `Err` (in words) when it is another build.
fn built(path: &std::path::Path, flavour: &Flavour) -> Result<Option<u64>, String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    let bytes = lichen_agent::files::read_bounded(path, MAX_BINARY_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mark = format!("{} ({})", env!("CARGO_PKG_VERSION"), flavour.name);
    if bytes.windows(mark.len()).any(|w| w == mark.as_bytes()) {
        Ok(Some(meta.len()))
    } else {
        Err(format!(
            "another build, not the {} (no {mark:?} in it): rebuild with `{}`",
            flavour.name, flavour.build
        ))
    }
}

pub(super) fn run() -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the running binary")?;
    let exe_size = std::fs::metadata(&exe)
        .with_context(|| format!("cannot read {}", exe.display()))?
        .len();
    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    let mut table = Table::new("size: the lichen binary");
    table.row(
        format!(
            "running binary ({build}, {}, {})",
            lichen_agent::flavour::name(),
            std::env::consts::ARCH
        ),
        fmt_size(exe_size),
        "<= 12 MB",
        REFERENCE,
    );
    let mut summary = Vec::new();
    let targets = lichen_agent::util::cargo_target_dir();
    for flavour in &FLAVOURS {
        let mut sizes = Vec::new();
        for triple in TARGETS {
            let figure = format!("static release, {}, {triple}", flavour.name);
            let measured = match &targets {
                None => "not built (no cargo target directory)".to_string(),
                Some(dir) => {
                    let path = dir.join(triple).join(flavour.profile).join("lichen");
                    match built(&path, flavour) {
                        Ok(Some(size)) => {
                            let over = if size > flavour.limit_bytes {
                                ", over the target"
                            } else {
                                ""
                            };
                            sizes.push(format!("{triple} {:.1} MB", size as f64 / 1e6));
                            format!("{}{over}", fmt_size(size))
                        }
                        Ok(None) => "not built".to_string(),
                        Err(why) => format!("not measured: {why}"),
                    }
                }
            };
            table.row(figure, measured, flavour.target, REFERENCE);
        }
        summary.push(if sizes.is_empty() {
            format!("{}: not built", flavour.name)
        } else {
            format!(
                "{} ({}): {}",
                flavour.name,
                flavour.target,
                sizes.join(", ")
            )
        });
    }
    table.note(format!("running binary: {}", exe.display()));
    table.note(match &targets {
        Some(dir) => format!("static builds looked for under {}", dir.display()),
        None => "static builds: no cargo target directory found ($CARGO_TARGET_DIR unset and the running binary is not in one)".to_owned(),
    });
    table.note(
        "profiles: release (full node) is opt-level z but s for Wasmtime, wasmtime-environ, WASI, Wasmtime's fibers and Lichen's host calls (an instance's load and start), small (small node, inherits release) opt-level z throughout, both LTO, one codegen unit, panic = abort, strip, and on the lld-linked musl targets no DWARF unwind tables (cli/build.rs; 1.16 MB of the aarch64 small node); SQLite without the extensions and APIs Lichen never uses (.cargo/config.toml); the full node holds Wasmtime with Cranelift for its own target, WASI 0.2, SQLite, containers, microVMs, Kubernetes pods (containerd's task server), the KubeEdge mapper and its embedded default guests (the operator's tool, the benches and cross-compiling are a developer's build: `lichen --version` then says `; operator, bench`); the small node the Wasm runtime without a compiler, devices and the hub link (no OCI spec code, no ttrpc stack)",
    );
    for flavour in &FLAVOURS {
        table.note(format!(
            "{}: `{}`; a target shows `not built` until then",
            flavour.name, flavour.build
        ));
    }
    table.print();
    Ok(vec![format!(
        "- Binary size: {} ({build}, {}); static release: {} (references: Wasmtime alone is 0.9 MB, 2.4 MB with WASI, 7 MB with Cranelift).",
        fmt_size(exe_size),
        std::env::consts::ARCH,
        summary.join("; "),
    )])
}
