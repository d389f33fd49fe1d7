//! Lichen as a KubeEdge device mapper.
#![warn(missing_docs)]

pub mod error;
pub mod host;
pub mod plan;
pub mod proto;
pub mod queue;
pub mod twin;
pub mod workload;
