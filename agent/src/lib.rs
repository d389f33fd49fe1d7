//! The Lichen agent: hosts WebAssembly device functions on an edge board, deploys them
//! atomically, hot-reloads them without losing an event, and keeps their state in SQLite.
//!
//! The binary `lichen` is a thin wrapper around this library: `lichen run` starts the daemon,
//! the other verbs talk to it over its local API.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deployment;
pub mod doctor;
pub mod embedded;
pub mod files;
pub mod grants;
pub mod hub;
#[cfg(feature = "kubeedge")]
pub mod kubeedge;
pub mod logs;
pub mod metrics;
pub mod pods;
pub mod runtime;
pub mod state_dir;
pub mod store;
pub mod supervisor;
pub mod update;
pub mod util;
