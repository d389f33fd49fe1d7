//! The local API: JSON over HTTP on a Unix socket (mode 0600).

pub mod client;
pub mod control;
pub mod server;
pub mod types;
