//! The `lichen` binary.
fn main() {}
