//! Test support: the stand-in EdgeCore, the fake agent, and KubeEdge objects for the
//! button-led example.

#![allow(dead_code)]

pub mod fake;
pub mod objects;
pub mod standin;

pub use objects::*;
