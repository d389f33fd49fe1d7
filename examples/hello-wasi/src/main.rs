//! # hello-wasi
//!
//! A plain WASI preview-1 command, with no Lichen imports: it proves the agent still runs
//! modules that only know WASI. It prints `hello from wasi`, then one line `NAME=value` for
//! each environment variable whose name starts with `LICHEN_` (sorted by name), and exits 0.
//!
//! Build with `cargo build --release --target wasm32-wasip1 -p hello-wasi` in `examples/`.

use std::io::Write;

fn main() {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| name.starts_with("LICHEN_"))
        .collect();
    vars.sort();
    let mut out = std::io::stdout().lock();
    let mut text = String::from("hello from wasi\n");
    for (name, value) in vars {
        text.push_str(&format!("{name}={value}\n"));
    }
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(1);
    }
}
