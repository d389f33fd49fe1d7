//! Generates the DMI v1beta1 messages, the `DeviceManagerService` client and the
//! `DeviceMapperService` server from KubeEdge's `api.proto`.
//!
//! protox parses the .proto in pure Rust (its well-known types, `google/protobuf/any.proto`,
//! are built in), so the build needs no `protoc`: a fresh machine, CI and cross builds run
//! `cargo build` alone, and the generated code cannot drift with the version of a system
//! compiler. Only the two services Lichen uses are generated on each side: the client of
//! EdgeCore's `DeviceManagerService` and the server of `DeviceMapperService`; the other side of
//! each exists only for the test stand-ins, which get it through the same generated module.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = Path::new("proto/kubeedge/dmi/v1beta1/api.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
