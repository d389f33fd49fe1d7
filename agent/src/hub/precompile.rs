//! Compiling off the node: `lichen hub deploy --precompile TARGET` (and `lichen hub bundle`)
//! compiles each module of a deployment for a node's target and engine settings, with the
//! same [`engine_config`] the node builds its engine with, and ships the compiled form beside
//! the source. Its sha256 and size go into the signed `artifacts`, and a
//! [`PrecompiledArtifact`] line ties it to its module and engine fingerprint, so a node loads
//! it only if the publisher signed it for that module and that engine.

use anyhow::{Context, Result, bail};

use super::PrecompiledArtifact;
use super::artifacts::LocalArtifact;
use crate::runtime::wasm::{CodeSettings, EngineOptions};

/// One engine to compile for: a node's target triple and the `[wasm]` settings that change
/// its code (the node reports both as `engine` in its reported state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecompileFor {
    /// Target triple (`aarch64-unknown-linux-musl`, ...).
    pub target: String,
    /// The node's engine sizing (`max_memory_bytes` and `memory_guard_bytes` count).
    pub options: EngineOptions,
}

impl PrecompileFor {
    /// The engine fingerprint of a node with these settings.
    pub fn fingerprint(&self) -> String {
        CodeSettings::new(&self.target, &self.options).fingerprint()
    }
}

/// Compiles each of `sources` for each engine of `engines`: the compiled artifacts to publish
/// beside the sources and the entries naming them in the desired state.
pub fn precompile(
    sources: &[LocalArtifact],
    engines: &[PrecompileFor],
) -> Result<(Vec<LocalArtifact>, Vec<PrecompiledArtifact>)> {
    let mut artifacts = Vec::new();
    let mut entries = Vec::new();
    for engine_for in engines {
        let engine = build(engine_for)?;
        let fingerprint = engine_for.fingerprint();
        for source in sources {
            let compiled = compile(&engine, &source.bytes).with_context(|| {
                format!(
                    "cannot precompile {} for target {}",
                    source.path.display(),
                    engine_for.target
                )
            })?;
            let sha256 = lichen_sync::sha256_hex(&compiled);
            entries.push(PrecompiledArtifact {
                module: source.digest.clone(),
                target: engine_for.target.clone(),
                engine: fingerprint.clone(),
                sha256: sha256.clone(),
            });
            if !artifacts.iter().any(|a: &LocalArtifact| a.digest == sha256) {
                let mut path = source.path.clone().into_os_string();
                path.push(format!(" ({})", engine_for.target));
                artifacts.push(LocalArtifact {
                    digest: sha256,
                    path: path.into(),
                    bytes: compiled,
                });
            }
        }
    }
    Ok((artifacts, entries))
}

/// The node's engine configuration for `engine_for`, with a pool of one instance (the pool
/// size does not change compiled code; the hub instantiates nothing).
#[cfg(feature = "compiler")]
fn build(engine_for: &PrecompileFor) -> Result<wasmtime::Engine> {
    let options = EngineOptions {
        max_instances: 1,
        ..engine_for.options
    };
    let config = crate::runtime::wasm::engine_config(&options, &engine_for.target)?;
    wasmtime::Engine::new(&config)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot make an engine for target {}", engine_for.target))
}

/// Stands for the compiling engine in a build without a compiler; never made.
#[cfg(not(feature = "compiler"))]
enum NoCompiler {}

#[cfg(not(feature = "compiler"))]
fn build(_: &PrecompileFor) -> Result<NoCompiler> {
    bail!(
        "this lichen was built without a compiler (cargo feature `compiler` off): precompile with a full build"
    )
}

#[cfg(feature = "compiler")]
fn compile(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Vec<u8>> {
    let compiled = if wasmparser::Parser::is_component(bytes) {
        engine.precompile_component(bytes)
    } else if wasmparser::Parser::is_core_wasm(bytes) {
        engine.precompile_module(bytes)
    } else {
        bail!("not a WebAssembly binary")
    };
    compiled.map_err(anyhow::Error::from)
}

#[cfg(not(feature = "compiler"))]
fn compile(engine: &NoCompiler, _: &[u8]) -> Result<Vec<u8>> {
    match *engine {}
}

/// The `--precompile` options of `lichen hub deploy` and `lichen hub bundle`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrecompileArgs {
    /// Also compile each module for a node with this target triple (what the node reports as
    /// `engine.target`; `host` for this machine's), and ship it signed beside the source: that
    /// node loads it without compiling. Repeat for several targets.
    #[arg(long, value_name = "TARGET")]
    pub precompile: Vec<String>,
    /// The node's `wasm.max-memory` (it changes compiled code; `engine.max-memory` in its
    /// reported state).
    #[arg(long, value_name = "SIZE", default_value = "32MiB")]
    pub engine_max_memory: String,
    /// The node's `wasm.memory-guard` (`engine.memory-guard` in its reported state).
    #[arg(long, value_name = "SIZE", default_value = "64KiB")]
    pub engine_memory_guard: String,
}

impl PrecompileArgs {
    /// The engines to compile for (none without `--precompile`).
    pub fn engines(&self) -> Result<Vec<PrecompileFor>> {
        let size = |value: &str, flag: &str| {
            crate::config::parse_size(value).with_context(|| format!("{flag} {value:?}"))
        };
        let options = EngineOptions {
            max_memory_bytes: size(&self.engine_max_memory, "--engine-max-memory")?,
            memory_guard_bytes: size(&self.engine_memory_guard, "--engine-memory-guard")?,
            ..EngineOptions::default()
        };
        parse_targets(&self.precompile, options)
    }
}

/// Parses `--precompile` values: a target triple, or `host` for this machine's own.
pub fn parse_targets(values: &[String], options: EngineOptions) -> Result<Vec<PrecompileFor>> {
    values
        .iter()
        .map(|v| {
            let target = if v == "host" {
                crate::runtime::wasm::host_target()
            } else {
                v.clone()
            };
            if target.is_empty()
                || target.len() > 64
                || !target
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                bail!("--precompile {v:?} is not a target triple");
            }
            Ok(PrecompileFor { target, options })
        })
        .collect()
}

#[cfg(all(test, feature = "compiler"))]
mod tests {
    use super::*;

    #[test]
    fn a_component_precompiled_for_another_target_names_that_engine() {
        let bytes = crate::embedded::COUNTER.to_vec();
        let source = LocalArtifact {
            digest: lichen_sync::sha256_hex(&bytes),
            path: "counter.wasm".into(),
            bytes,
        };
        let engines = parse_targets(
            &["aarch64-unknown-linux-musl".to_owned(), "host".to_owned()],
            EngineOptions::default(),
        )
        .unwrap();
        let (artifacts, entries) = precompile(std::slice::from_ref(&source), &engines).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(artifacts.len(), 2, "one compiled form per target");
        assert_eq!(entries[0].module, source.digest);
        assert_eq!(entries[0].target, "aarch64-unknown-linux-musl");
        assert_eq!(entries[0].engine, engines[0].fingerprint());
        assert_ne!(entries[0].engine, entries[1].engine);
        assert_eq!(entries[0].sha256, artifacts[0].digest);
        let err = parse_targets(&["x86_64\nevil".to_owned()], EngineOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--precompile"), "{err}");
    }
}
