//! Lichen's link to the hub: an MQTT 3.1.1 session that drains the agent's outbox upstream and
//! brings deployments and commands down, surviving weeks offline without losing a record.
//!
//! The decisions live in plain structs that tests drive without a network, as rumqttc's own
//! `state.rs` does: [`Topics`] (the topic scheme), [`MessageId`] and [`Envelope`] (what every
//! message carries), [`Drain`] (what to publish next, what is acknowledged, what to resend),
//! [`Quota`] (what to drop when the outbox outgrows its disk quota), [`Backoff`] (when to
//! reconnect), [`InboundDedup`] (whether a command is new) and the [`guard`] (what to do with a
//! message too large to read). [`SyncSession`] is the thin socket loop around them. The crate knows no Wasmtime and no SQLite: the agent owns the outbox
//! table and hands rows over through the [`Outbox`] trait.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lichen_sync::{RowKind, SessionConfig, SessionEvent, SyncSession, testing::FakeOutbox};
//!
//! # async fn demo() -> Result<(), lichen_sync::ConfigError> {
//! let outbox = Arc::new(FakeOutbox::new()); // the agent passes its SQLite outbox here
//! outbox.push(RowKind::Telemetry, "door", "temp", serde_json::json!({"celsius": 21.5}));
//! let config = SessionConfig::new("pi-7", "hub.example", 1883);
//! let (session, handle, mut events) = SyncSession::new(config, outbox)?;
//! tokio::spawn(session.run());
//! while let Some(event) = events.recv().await {
//!     if let SessionEvent::Inbound(msg) = event {
//!         println!("from the hub: {msg:?}");
//!     }
//! }
//! handle.shutdown();
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod artifact;
mod backoff;
mod client;
mod clock;
mod config;
mod dedup;
mod drain;
pub mod guard;
mod handle;
mod inbound;
mod link;
mod message;
mod outbox;
mod quota;
mod session;
pub mod testing;
pub mod topics;
mod url;

pub use artifact::{
    ArtifactError, Assembly, DEFAULT_CHUNK_SIZE, MAX_ARTIFACT_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
    Manifest, sha256_hex,
};
pub use backoff::Backoff;
pub use client::{ProbeError, probe};
pub use clock::{millis, now_ms};
pub use config::{
    ConfigError, DEFAULT_MAX_COMMAND_BYTES, DEFAULT_MAX_PACKET_BYTES, SessionConfig, TlsFiles,
    rustls_config,
};
pub use dedup::InboundDedup;
pub use drain::{Drain, PublishRequest, Unpublishable, UnpublishableRow};
pub use handle::{SessionEvent, SyncHandle};
pub use inbound::{Inbound, InboundAck, InboundError};
pub use message::{BadMessageId, Envelope, MessageId};
pub use outbox::{Outbox, OutboxError, Row, RowId, RowKind};
pub use quota::{DropPlan, Quota, RowSize};
pub use session::SyncSession;
pub use topics::{NameError, TopicKind, Topics, is_digest};
pub use url::{HubUrl, UrlError};
