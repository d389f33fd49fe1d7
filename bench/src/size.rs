//! `size`: the size of the running binary and of the static release binaries, if built.

use anyhow::{Context, Result};

use super::Table;

/// The shipped targets, whose release builds land in `<target dir>/<triple>/release/lichen`.
const TARGETS: [&str; 3] = [
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
    "riscv64gc-unknown-linux-gnu",
];

const TARGET: &str = "<= 12 MB";
const REFERENCE: &str = "Wasmtime runtime alone 0.9 MB; + WASI 2.4 MB; + Cranelift 7 MB";

/// `12.3 MB (11.7 MiB)`.
fn fmt_size(bytes: u64) -> String {
    format!(
        "{:.1} MB ({})",
        bytes as f64 / 1e6,
        lichen_agent::util::human_bytes(bytes)
    )
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
        format!("running binary ({build}, {})", std::env::consts::ARCH),
        fmt_size(exe_size),
        TARGET,
        REFERENCE,
    );
    let mut built = Vec::new();
    let targets = lichen_agent::util::cargo_target_dir();
    for triple in TARGETS {
        let path = targets
            .as_ref()
            .map(|dir| dir.join(triple).join("release").join("lichen"));
        match path.map(std::fs::metadata) {
            Some(Ok(meta)) => {
                table.row(
                    format!("static release, {triple}"),
                    fmt_size(meta.len()),
                    TARGET,
                    REFERENCE,
                );
                built.push(format!("{triple} {:.1} MB", meta.len() as f64 / 1e6));
            }
            Some(Err(_)) | None => table.row(
                format!("static release, {triple}"),
                "not built",
                TARGET,
                REFERENCE,
            ),
        }
    }
    table.note(format!("running binary: {}", exe.display()));
    table.note(match &targets {
        Some(dir) => format!("static builds looked for under {}", dir.display()),
        None => "static builds: no cargo target directory found ($CARGO_TARGET_DIR unset and the running binary is not in one)".to_owned(),
    });
    table.note(
        "release profile: opt-level s, LTO, one codegen unit, panic = abort, strip; the binary holds Wasmtime with Cranelift, WASI 0.2, SQLite and the embedded example guests",
    );
    table.note(
        "static builds: `cargo build --release -p lichen --target <triple>`; a target shows `not built` until then",
    );
    table.print();
    let static_builds = if built.is_empty() {
        "static release binaries not built".to_string()
    } else {
        format!("static release: {}", built.join(", "))
    };
    Ok(vec![format!(
        "- Binary size: {} ({build}, {}); {static_builds} (target <= 12 MB; references: Wasmtime alone is 0.9 MB, 2.4 MB with WASI, 7 MB with Cranelift).",
        fmt_size(exe_size),
        std::env::consts::ARCH,
    )])
}
