//! Runtimes that run workloads. Only `wasm` exists so far; container and microVM runtimes
//! come later behind the same shape.

pub mod wasm;
