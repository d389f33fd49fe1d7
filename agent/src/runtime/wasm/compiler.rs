//! Compiling and loading artifacts for the artifact store: the compile/serialize calls behind
//! the `compiler` feature (with stand-ins that refuse when it is off, so a small-board build
//! carries no compiler), and the mapping of precompiled files into the engine.

use std::path::Path;

#[cfg(not(feature = "compiler"))]
use anyhow::bail;
use anyhow::{Context, Result};
use wasmtime::Module;
use wasmtime::component::Component;

use super::IntoAnyhow;

#[cfg(feature = "compiler")]
pub(super) fn compile_component(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Component> {
    Component::new(engine, bytes).anyhow()
}

#[cfg(not(feature = "compiler"))]
pub(super) fn compile_component(_: &wasmtime::Engine, _: &[u8]) -> Result<Component> {
    bail!("this agent was built without a compiler")
}

#[cfg(feature = "compiler")]
pub(super) fn compile_module(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Module> {
    Module::new(engine, bytes).anyhow()
}

#[cfg(feature = "compiler")]
pub(super) fn serialize_module(module: &Module) -> Result<Vec<u8>> {
    module.serialize().anyhow()
}

#[cfg(not(feature = "compiler"))]
pub(super) fn serialize_module(_: &Module) -> Result<Vec<u8>> {
    bail!("this agent was built without a compiler")
}

#[cfg(not(feature = "compiler"))]
pub(super) fn compile_module(_: &wasmtime::Engine, _: &[u8]) -> Result<Module> {
    bail!("this agent was built without a compiler")
}

/// Maps a compiled component file into this engine.
#[allow(unsafe_code)]
pub(super) fn deserialize_component_file(
    engine: &wasmtime::Engine,
    path: &Path,
) -> Result<Component> {
    // SAFETY: Wasmtime requires a file made by `serialize`/`precompile_component` that nobody
    // changes while it is mapped. The store's files are written only by this agent, by
    // rename (a new inode; a mapped file is never written in place), after their sha256 was
    // checked: against the source's own compilation, or the digest a verified signature
    // names. `compiled_ready` checked the file is still the one recorded then. Wasmtime
    // itself checks the header and that the engine settings match.
    unsafe { Component::deserialize_file(engine, path) }
        .anyhow()
        .context("cannot load the compiled component")
}

/// Maps a compiled core module file into this engine.
#[allow(unsafe_code)]
pub(super) fn deserialize_module_file(engine: &wasmtime::Engine, path: &Path) -> Result<Module> {
    // SAFETY: as for `deserialize_component_file`: a file this agent wrote by rename after
    // checking its sha256, still the one recorded then.
    unsafe { Module::deserialize_file(engine, path) }
        .anyhow()
        .context("cannot load the compiled module")
}
