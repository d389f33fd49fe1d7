//! Test support: the stand-in EdgeCore, the fake agent, the watched report queue, and KubeEdge
//! objects for the button-led example.

#![allow(dead_code)]

pub mod fake;
pub mod objects;
pub mod queue;
pub mod standin;

pub use objects::*;
