//! Device functions built into the binary for the default deployment.
