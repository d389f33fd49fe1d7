//! The Lichen agent: hosts WebAssembly device functions on an edge board, deploys them
//! atomically, hot-reloads them without losing an event, and keeps their state in SQLite.
//!
//! The binary `lichen` is a thin wrapper around this library: `lichen run` starts the daemon,
//! the other verbs talk to it over its local API.

pub mod api;
pub mod cli;
pub mod deployment;
pub mod embedded;
pub mod store;
