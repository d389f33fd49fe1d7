//! Link settings of the `lichen` binary.
//!
//! A build that aborts on panic (`release` and the profiles that inherit it: `small`, `smoke`) and
//! links with LLVM's lld (the static musl targets, `.cargo/config.toml`) leaves out the DWARF
//! unwind tables (`.eh_frame`, `.eh_frame_hdr`): nothing in such a binary unwinds, a panic still
//! prints its message and location, and the tables were 1.16 MB of the aarch64 small node. What
//! goes is the stack trace `RUST_BACKTRACE` would print and DWARF-based stack walking by debuggers;
//! profilers keep frame pointers. `LICHEN_KEEP_UNWIND_TABLES=1` keeps them. Builds that unwind
//! (tests, `cargo build` in the dev profile) or link with a C compiler driver (glibc targets, whose
//! static startup code registers these tables) are left alone.

use std::env;
use std::path::Path;

/// The linker script (`link/no-unwind-tables.ld`); compiled in, so a change to it rebuilds and
/// reruns this script.
const LINKER_SCRIPT: &str = include_str!("link/no-unwind-tables.ld");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LICHEN_KEEP_UNWIND_TABLES");
    // Cargo tells a build script only whether the profile inherits `release`, not its panic
    // strategy; every such profile of this workspace aborts (Cargo.toml, `[profile.release]`).
    let aborts = env::var("PROFILE").as_deref() == Ok("release");
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let keep = env::var_os("LICHEN_KEEP_UNWIND_TABLES").is_some_and(|v| v != "0" && !v.is_empty());
    if !aborts || !linux || keep || !links_with_lld() {
        return;
    }
    // The script is written into OUT_DIR (inside the target directory) and linked from there,
    // not from the source tree: Cargo reuses this script's output for any checkout that shares
    // the target directory (a CI clone, a moved checkout), so a source path here would point
    // into a checkout that may be gone.
    let out = env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let script = Path::new(&out).join("no-unwind-tables.ld");
    std::fs::write(&script, LINKER_SCRIPT)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
    println!("cargo:rustc-link-arg-bins=--no-eh-frame-hdr");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}

/// Whether the target's linker (as configured for cargo) is lld itself, which takes linker
/// flags as they are; a C compiler driver would need them wrapped in `-Wl,`.
fn links_with_lld() -> bool {
    env::var("RUSTC_LINKER").is_ok_and(|linker| {
        let name = Path::new(&linker)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        name == "rust-lld" || name == "ld.lld"
    })
}
