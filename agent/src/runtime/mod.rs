//! Runtimes that run workloads: `wasm` (one Wasmtime engine in-process) and `container`
//! (OCI bundles through crun/runc); the microVM runtime comes later behind the same shape.

pub mod container;
pub mod microvm;
pub mod wasm;
