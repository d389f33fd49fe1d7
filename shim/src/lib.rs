//! Lichen's containerd shim: Kubernetes pods whose entrypoint is a `.wasm` file run as
//! workloads of the node's one resident Lichen agent.
//!
//! containerd reaches a runtime through a shim v2 binary, here `containerd-shim-lichen-v1`
//! (runtime type `io.containerd.lichen.v1`). Its `start` command does not start a shim
//! process per container: it prints the address of the agent's task server (the shim API lets
//! `start` return an existing shim's address), where [`TaskService`] serves containerd's ttrpc
//! Task API v2 for every pod. The service reads each task's OCI bundle ([`spec`]), mounts the
//! rootfs containerd prepared ([`mounts`]), reads the Wasm entrypoint from it ([`entrypoint`]),
//! opens containerd's stdout/stderr FIFOs ([`io`]) and hands the program to the agent through
//! the [`PodAgent`] trait; task events go back to containerd in order ([`events`]).
//!
//! ```no_run
//! # async fn run(agent: std::sync::Arc<impl lichen_shim::PodAgent>) -> anyhow::Result<()> {
//! use std::sync::Arc;
//! let service = Arc::new(lichen_shim::TaskService::new(agent));
//! let server = lichen_shim::serve(std::path::Path::new(lichen_shim::DEFAULT_SOCKET), service).await?;
//! // ... until the agent stops:
//! server.shutdown().await;
//! # Ok(()) }
//! ```

//!
//! Without its default feature `task-service` the crate is only [`socket`]: the socket's
//! default path and environment variable, which a node built without pods still names in its
//! configuration.

#[cfg(feature = "task-service")]
pub mod agent;
#[cfg(feature = "task-service")]
pub mod bootstrap;
#[cfg(feature = "task-service")]
pub mod entrypoint;
#[cfg(feature = "task-service")]
pub mod events;
#[cfg(feature = "task-service")]
pub mod io;
#[cfg(feature = "image-layout")]
pub mod layout;
#[cfg(feature = "task-service")]
pub mod mounts;
#[cfg(feature = "task-service")]
pub mod server;
#[cfg(feature = "task-service")]
pub mod service;
pub mod socket;
#[cfg(feature = "task-service")]
pub mod spec;
#[cfg(all(feature = "task-service", any(test, feature = "testing")))]
pub mod testing;

#[cfg(feature = "task-service")]
pub use agent::{AgentError, Exit, PodAgent, PodWorkload, WorkloadStatus};
#[cfg(feature = "task-service")]
pub use server::{ServeError, TaskServer, serve};
#[cfg(feature = "task-service")]
pub use service::TaskService;
pub use socket::{DEFAULT_SOCKET, SOCKET_ENV};
