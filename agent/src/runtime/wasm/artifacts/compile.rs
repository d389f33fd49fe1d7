//! Compiling and linking: a binary's compiled form (its trusted cached compilation, mapped, or
//! compiled here) linked against the world into a device function or a WASI command.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use lichen_host_apis::{DeviceFunctionPre, WORLD};
use wasmtime::Module;
use wasmtime::component::Component;
use wasmtime_wasi::p2::bindings::CommandPre;

use super::{Artifact, ArtifactKind, ArtifactStore, COMPILER};
use crate::runtime::wasm::IntoAnyhow;
use crate::runtime::wasm::command::CommandProgram;
use crate::runtime::wasm::compiler::{
    compile_component, compile_module, deserialize_component_file, deserialize_module_file,
    serialize_module,
};

impl ArtifactStore {
    /// The compiled form of `digest`: its trusted compiled file, mapped, else compiled here
    /// (`true`: freshly compiled, to be cached once accepted).
    pub(super) fn component_for(&self, digest: &str, bytes: &[u8]) -> Result<(Component, bool)> {
        let engine = self.engine.engine();
        if let Some(path) = self.compiled_ready(digest) {
            match deserialize_component_file(engine, &path) {
                Ok(component) => {
                    self.counts
                        .precompiled_loads
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok((component, false));
                }
                Err(e) => {
                    tracing::warn!(module = %digest, "the compiled component does not load into this engine ({e:#}); compiling the source instead")
                }
            }
        }
        let component = self.compile(digest, || {
            compile_component(engine, bytes).context("the component does not compile")
        })?;
        Ok((component, true))
    }

    pub(super) fn module_for(&self, digest: &str, bytes: &[u8]) -> Result<(Module, bool)> {
        let engine = self.engine.engine();
        if let Some(path) = self.compiled_ready(digest) {
            match deserialize_module_file(engine, &path) {
                Ok(module) => {
                    self.counts
                        .precompiled_loads
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok((module, false));
                }
                Err(e) => {
                    tracing::warn!(module = %digest, "the compiled module does not load into this engine ({e:#}); compiling the source instead")
                }
            }
        }
        let module = self.compile(digest, || {
            compile_module(engine, bytes).context("the core module does not compile")
        })?;
        Ok((module, true))
    }

    /// Compiles on this node, counted and logged; refused, naming what to do, on a node built
    /// without a compiler.
    pub(super) fn compile<T>(
        &self,
        digest: &str,
        compile: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !COMPILER {
            bail!(
                "module sha256:{digest} has no compiled form for this node's engine (target {}, engine fingerprint {}), and this agent was built without a compiler (cargo feature `compiler` off): precompile it on the hub with `lichen hub deploy --precompile {}`",
                self.engine.target(),
                self.engine.fingerprint(),
                self.engine.target(),
            );
        }
        tracing::info!(module = %digest, "compiling module sha256:{digest} on this node");
        let compiled = compile()?;
        self.counts.compiled.fetch_add(1, Ordering::Relaxed);
        Ok(compiled)
    }

    pub(super) fn load_component(&self, digest: &str, bytes: &[u8]) -> Result<Artifact> {
        let (component, fresh) = self.component_for(digest, bytes)?;
        let artifact = self.link_component(digest, &component)?;
        // Cached only once accepted: a refused component leaves no compilation behind.
        if fresh {
            self.write_compiled(
                digest,
                &component
                    .serialize()
                    .anyhow()
                    .context("cannot serialize the compiled component")?,
            )?;
        }
        Ok(artifact)
    }

    /// Links a compiled component as a device function, else as a `wasi:cli/run` command.
    pub(super) fn link_component(&self, digest: &str, component: &Component) -> Result<Artifact> {
        let device = self
            .engine
            .linker()
            .instantiate_pre(component)
            .anyhow()
            .with_context(|| format!("the component's imports are not all in world {WORLD}"))
            .and_then(|pre| {
                DeviceFunctionPre::new(pre).anyhow().with_context(|| {
                    format!(
                        "the component does not have the exports of world {WORLD} (`init` and `on-event`)"
                    )
                })
            });
        match device {
            Ok(pre) => Ok(Artifact {
                digest: digest.to_string(),
                kind: ArtifactKind::Component,
                component: Some(pre),
                command: None,
            }),
            Err(device_err) => {
                // Not a device function: a WASI program exporting `wasi:cli/run` runs as a
                // command.
                let cli = self
                    .engine
                    .cli_linker()
                    .instantiate_pre(component)
                    .and_then(CommandPre::new);
                match cli {
                    Ok(pre) => Ok(Artifact {
                        digest: digest.to_string(),
                        kind: ArtifactKind::Command,
                        component: None,
                        command: Some(CommandProgram::Component(pre)),
                    }),
                    Err(_) => Err(device_err.context(format!(
                        "the component is neither a device function of world {WORLD} nor a WASI command exporting wasi:cli/run with WASI 0.2 imports only"
                    ))),
                }
            }
        }
    }

    pub(super) fn load_command(&self, digest: &str, bytes: &[u8]) -> Result<Artifact> {
        let (module, fresh) = self.module_for(digest, bytes)?;
        let artifact = self.link_module(digest, &module)?;
        if fresh {
            self.write_compiled(
                digest,
                &serialize_module(&module).context("cannot serialize the compiled module")?,
            )?;
        }
        Ok(artifact)
    }

    pub(super) fn link_module(&self, digest: &str, module: &Module) -> Result<Artifact> {
        let has_start = module
            .exports()
            .any(|e| e.name() == "_start" && e.ty().func().is_some());
        if !has_start {
            bail!(
                "this is a core WebAssembly module, not a component: device functions must be components of world {WORLD} (build for wasm32-wasip2), and core modules run only as WASI preview-1 commands that export `_start`"
            );
        }
        let pre = self
            .engine
            .command_linker()
            .instantiate_pre(module)
            .anyhow()
            .context("the WASI command imports something other than wasi_snapshot_preview1")?;
        Ok(Artifact {
            digest: digest.to_string(),
            kind: ArtifactKind::Command,
            component: None,
            command: Some(CommandProgram::Module(pre)),
        })
    }
}
