//! The Lichen agent: hosts WebAssembly device functions on an edge board, deploys them
//! atomically, hot-reloads them without losing an event, and keeps their state in SQLite.
//!
//! The binary `lichen` (package `lichen`, `cli/`) is a thin wrapper around this library:
//! `lichen run` starts the daemon ([`daemon`]), the other verbs talk to it over its local API.

pub mod api;
pub mod config;
pub mod daemon;
/// Deployment files (the `lichen-deployment` crate, shared with the operator tool).
pub use lichen_deployment as deployment;
pub mod doctor;
pub mod embedded;
pub mod files;
pub mod flavour;
pub mod grants;
pub mod hub;
pub mod keys;
#[cfg(feature = "kubeedge")]
pub mod kubeedge;
pub mod logs;
pub mod metrics;
#[cfg(feature = "pods")]
pub mod pods;
pub mod render;
pub mod runtime;
pub mod state_dir;
/// The SQLite state store (the `lichen-store` crate).
pub use lichen_store as store;
pub mod supervisor;
pub mod update;
pub mod util;
