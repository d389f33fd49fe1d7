//! # hello-wasi
//!
//! A plain WASI command, with no Lichen imports: built for `wasm32-wasip1` it is a preview-1
//! command module, built for `wasm32-wasip2` a component exporting `wasi:cli/run`; it proves
//! the agent runs programs that only know WASI. It prints `hello from wasi`, then one line
//! `NAME=value` for each environment variable whose name starts with `LICHEN_` (sorted by
//! name), and exits with the code in `LICHEN_EXIT` (0 when unset).
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
    for (name, value) in &vars {
        text.push_str(&format!("{name}={value}\n"));
    }
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(1);
    }
    let code = vars
        .iter()
        .find(|(name, _)| name == "LICHEN_EXIT")
        .and_then(|(_, value)| value.parse::<i32>().ok())
        .unwrap_or(0);
    std::process::exit(code);
}
