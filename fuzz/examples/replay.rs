//! Runs fuzz inputs through a target and says, for each, whether it passes or how it fails:
//!
//! ```sh
//! cargo run -p lichen-fuzz --example replay -- TARGET FILE...
//! ```
//!
//! A file under `fuzz/artifacts/<target>/` (libFuzzer) or `$TMPDIR/lichen-fuzz-failures/`
//! (the stable pass) replays the same way; the exit status is 1 if any input failed.
//! `--raw DIR` (before the files) also writes, for the text targets, each generated input's
//! raw form (its document's text) to DIR: regression inputs that survive generator changes.

use std::panic::{AssertUnwindSafe, catch_unwind};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: replay TARGET FILE...");
        std::process::exit(2);
    };
    let Some((_, target)) = lichen_fuzz::targets::ALL.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = lichen_fuzz::targets::ALL.iter().map(|(n, _)| *n).collect();
        eprintln!("no target {name:?}; targets: {}", names.join(", "));
        std::process::exit(2);
    };
    lichen_fuzz::harness::install_hook();
    let mut files: Vec<String> = args.collect();
    let raw_dir = if files.first().map(String::as_str) == Some("--raw") {
        files.remove(0);
        Some(files.remove(0))
    } else {
        None
    };
    let mut failed = false;
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        if let (Some(dir), Some(raw)) = (&raw_dir, lichen_fuzz::targets::as_raw(&name, &bytes)) {
            let base = std::path::Path::new(&file)
                .file_name()
                .expect("a file name");
            let out = std::path::Path::new(dir).join(base);
            std::fs::write(&out, raw).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
            println!("{file}: raw form in {}", out.display());
        }
        match catch_unwind(AssertUnwindSafe(|| target(&bytes))) {
            Ok(()) => println!("{file}: ok"),
            Err(panic) => {
                failed = true;
                println!(
                    "{file}: FAILED: {}",
                    lichen_fuzz::harness::describe(panic.as_ref())
                );
            }
        }
    }
    std::process::exit(i32::from(failed));
}
