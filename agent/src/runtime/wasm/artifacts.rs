//! The artifact store: Wasm binaries kept by sha256 digest, each precompiled once for this
//! engine and cached on disk (`<digest>.<engine fingerprint>.cwasm`) and in memory.
//!
//! Files are written 0600 and only once a binary is accepted (it compiles and links against
//! the world), so a refused module leaves nothing behind. What no deployment uses is removed by
//! [`ArtifactStore::collect_garbage`], except binaries added on purpose for a deployment to come
//! ([`ArtifactStore::add`]: hub transfers, bundles), which are kept until a deployment uses them
//! or the agent restarts.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use lichen_host_apis::{DeviceFunctionPre, WORLD};
use wasmtime::component::Component;
use wasmtime::{Module, Precompiled};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::IntoAnyhow;
use super::command::CommandProgram;
use super::engine::WasmEngine;
use super::instance::InstanceData;

/// What kind of program an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A component of Lichen's device-function world.
    Component,
    /// A WASI command program: a preview-1 core module exporting `_start`, or a component
    /// exporting `wasi:cli/run`.
    Command,
}

impl ArtifactKind {
    /// The name `ps` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Component => "wasm",
            Self::Command => "wasi-command",
        }
    }
}

/// A compiled artifact, ready to instantiate.
pub struct Artifact {
    digest: String,
    kind: ArtifactKind,
    component: Option<DeviceFunctionPre<InstanceData>>,
    command: Option<CommandProgram>,
}

impl Artifact {
    /// sha256 of the Wasm binary, 64 lowercase hex digits.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Component or command module.
    pub fn kind(&self) -> ArtifactKind {
        self.kind
    }

    /// The pre-instantiated component, for device functions.
    pub fn component(&self) -> Option<&DeviceFunctionPre<InstanceData>> {
        self.component.as_ref()
    }

    /// The pre-instantiated program, for WASI commands.
    pub fn command(&self) -> Option<&CommandProgram> {
        self.command.as_ref()
    }
}

/// Content-addressed store of Wasm binaries and their precompiled forms.
pub struct ArtifactStore {
    dir: PathBuf,
    engine: Arc<WasmEngine>,
    loaded: Mutex<HashMap<String, Arc<Artifact>>>,
    /// Digests added for a deployment to come, spared by garbage collection until a deployment
    /// uses them. Held across a whole collection, so a binary added meanwhile is never swept.
    kept: Mutex<HashSet<String>>,
}

/// What [`ArtifactStore::collect_garbage`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Files removed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Hex sha256 of `bytes`: the one definition lives with the wire contract in `lichen-sync`.
pub use lichen_sync::sha256_hex;

impl ArtifactStore {
    /// Largest Wasm binary the store takes from a file: 128 MiB. A module path naming a larger
    /// file is refused before it is read.
    pub const MAX_MODULE_BYTES: u64 = 128 << 20;
    /// Largest cached compilation the store reads back (a compilation is larger than its
    /// binary; a larger file is treated as damaged and compiled again).
    const MAX_COMPILED_BYTES: u64 = 4 * Self::MAX_MODULE_BYTES;

    /// Opens (creating) the store under `dir`.
    pub fn open(dir: &Path, engine: Arc<WasmEngine>) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create artifact directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            engine,
            loaded: Mutex::new(HashMap::new()),
            kept: Mutex::new(HashSet::new()),
        })
    }

    /// The engine artifacts are compiled for.
    pub fn engine(&self) -> &Arc<WasmEngine> {
        &self.engine
    }

    fn source_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.wasm"))
    }

    fn compiled_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}.{}.cwasm", self.engine.fingerprint()))
    }

    /// Tells whether the store holds the binary with this digest.
    pub fn contains(&self, digest: &str) -> bool {
        self.source_path(digest).is_file()
    }

    fn cached(&self, digest: &str) -> Option<Arc<Artifact>> {
        self.loaded.lock().ok()?.get(digest).cloned()
    }

    /// Adds a Wasm binary for a deployment to come (a hub transfer, a bundle, the embedded
    /// default): checks it, compiles it (or reuses the cached compilation) and stores both. A
    /// binary that does not compile or is not a device function or WASI command is refused and
    /// nothing is written. The binary is spared by [`collect_garbage`](Self::collect_garbage)
    /// until a deployment uses it (or the agent restarts).
    pub async fn add(self: &Arc<Self>, bytes: Vec<u8>) -> Result<Arc<Artifact>> {
        self.insert(bytes, true).await
    }

    /// Adds a Wasm binary that the deployment being prepared names: as [`add`](Self::add),
    /// but garbage unless that deployment is applied.
    pub async fn add_for_deployment(self: &Arc<Self>, bytes: Vec<u8>) -> Result<Arc<Artifact>> {
        self.insert(bytes, false).await
    }

    /// Reads a module file for a deployment (a regular file of at most
    /// [`MAX_MODULE_BYTES`](Self::MAX_MODULE_BYTES), opened without blocking, off the async
    /// workers) and adds it with [`add_for_deployment`](Self::add_for_deployment).
    pub async fn add_file(self: &Arc<Self>, path: &Path) -> Result<Arc<Artifact>> {
        let file = path.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || {
            crate::files::read_bounded(&file, Self::MAX_MODULE_BYTES)
        })
        .await
        .context("the module reading task failed")?
        .context("cannot read module file")?;
        self.add_for_deployment(bytes)
            .await
            .with_context(|| path.display().to_string())
    }

    async fn insert(self: &Arc<Self>, bytes: Vec<u8>, keep: bool) -> Result<Arc<Artifact>> {
        let digest = sha256_hex(&bytes);
        if keep {
            // Before anything is written: a collection running now finishes first.
            self.kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(digest.clone());
        }
        if let Some(artifact) = self.cached(&digest) {
            return Ok(artifact);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let added = store.add_blocking(digest, bytes);
            // A compile frees megabytes the allocator would otherwise keep.
            crate::util::release_free_heap();
            added
        })
        .await
        .context("compilation task failed")?
    }

    /// Loads the artifact with this digest from the store.
    pub async fn load(self: &Arc<Self>, digest: &str) -> Result<Arc<Artifact>> {
        if let Some(artifact) = self.cached(digest) {
            return Ok(artifact);
        }
        let path = self.source_path(digest);
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                crate::files::read_bounded(&path, Self::MAX_MODULE_BYTES)
            })
            .await
            .context("the artifact reading task failed")?
        };
        let bytes = read.with_context(|| {
            format!(
                "no artifact sha256:{digest} in the artifact store ({})",
                path.display()
            )
        })?;
        if sha256_hex(&bytes) != digest {
            bail!(
                "artifact sha256:{digest} in the store is corrupt: its content has another digest"
            );
        }
        self.insert(bytes, false).await
    }

    /// Removes every binary and compilation that neither `in_use` (digests the applied
    /// deployment uses) nor the kept set names, compilations for another engine, and temporary
    /// files other processes left; the kept digests that `in_use` names are no longer kept
    /// (the deployment now holds them). Runs on the calling thread (it only lists and unlinks).
    pub fn collect_garbage(&self, in_use: &BTreeSet<String>) -> Collected {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|digest| !in_use.contains(digest));
        let wanted = |digest: &str| in_use.contains(digest) || kept.contains(digest);
        let mut collected = Collected::default();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return collected;
        };
        let own_temporary = format!(".{}.", std::process::id());
        let fingerprint = self.engine.fingerprint();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let garbage = if let Some(digest) = name.strip_suffix(".wasm") {
                !wanted(digest)
            } else if let Some((digest, rest)) = name.split_once('.')
                && (rest.ends_with(".cwasm") || rest.ends_with(".cwasm.sha256"))
                && !name.starts_with('.')
            {
                !wanted(digest) || !rest.starts_with(&format!("{fingerprint}."))
            } else {
                name.starts_with('.') && name.ends_with(".tmp") && !name.contains(&own_temporary)
            };
            if !garbage {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    collected.files += 1;
                    collected.bytes = collected.bytes.saturating_add(size);
                }
                Err(err) => {
                    tracing::warn!(file = %entry.path().display(), "cannot remove an unused artifact: {err}");
                }
            }
        }
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.retain(|digest, _| wanted(digest));
        }
        collected
    }

    fn add_blocking(&self, digest: String, bytes: Vec<u8>) -> Result<Arc<Artifact>> {
        let compiled = self.compiled_path(&digest);
        let had_compiled = compiled.exists();
        let loaded = match Self::precompiled_kind(&bytes)? {
            Precompiled::Component => self.load_component(&digest, &bytes),
            Precompiled::Module => self.load_command(&digest, &bytes),
        };
        let artifact = match loaded {
            Ok(artifact) => artifact,
            Err(e) => {
                // Compiling writes the cache before the kind is checked: a refused binary
                // leaves nothing behind.
                if !had_compiled {
                    let _ = fs::remove_file(checksum_path(&compiled));
                    let _ = fs::remove_file(&compiled);
                }
                return Err(e);
            }
        };
        if !self.contains(&digest) {
            write_atomically(&self.source_path(&digest), &bytes)?;
        }
        let artifact = Arc::new(artifact);
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(digest, artifact.clone());
        }
        Ok(artifact)
    }

    fn precompiled_kind(bytes: &[u8]) -> Result<Precompiled> {
        if wasmparser::Parser::is_component(bytes) {
            Ok(Precompiled::Component)
        } else if wasmparser::Parser::is_core_wasm(bytes) {
            Ok(Precompiled::Module)
        } else if bytes.len() < 8 {
            bail!("not a WebAssembly binary: only {} bytes long", bytes.len())
        } else {
            bail!(
                "not a WebAssembly binary: it does not start with the `\\0asm` magic and a known version"
            )
        }
    }

    fn load_component(&self, digest: &str, bytes: &[u8]) -> Result<Artifact> {
        let engine = self.engine.engine();
        let (component, fresh) = match self.read_compiled(digest)? {
            Some(compiled) => (deserialize_component(engine, &compiled)?, false),
            None => (
                Component::new(engine, bytes)
                    .anyhow()
                    .context("the component does not compile")?,
                true,
            ),
        };
        let device = self
            .engine
            .linker()
            .instantiate_pre(&component)
            .anyhow()
            .with_context(|| format!("the component's imports are not all in world {WORLD}"))
            .and_then(|pre| {
                DeviceFunctionPre::new(pre).anyhow().with_context(|| {
                    format!(
                        "the component does not have the exports of world {WORLD} (`init` and `on-event`)"
                    )
                })
            });
        let artifact = match device {
            Ok(pre) => Artifact {
                digest: digest.to_string(),
                kind: ArtifactKind::Component,
                component: Some(pre),
                command: None,
            },
            Err(device_err) => {
                // Not a device function: a WASI program exporting `wasi:cli/run` runs as a
                // command.
                let cli = self
                    .engine
                    .cli_linker()
                    .instantiate_pre(&component)
                    .and_then(CommandPre::new);
                match cli {
                    Ok(pre) => Artifact {
                        digest: digest.to_string(),
                        kind: ArtifactKind::Command,
                        component: None,
                        command: Some(CommandProgram::Component(pre)),
                    },
                    Err(_) => {
                        return Err(device_err.context(format!(
                            "the component is neither a device function of world {WORLD} nor a WASI command exporting wasi:cli/run with WASI 0.2 imports only"
                        )));
                    }
                }
            }
        };
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

    fn load_command(&self, digest: &str, bytes: &[u8]) -> Result<Artifact> {
        let engine = self.engine.engine();
        let (module, fresh) = match self.read_compiled(digest)? {
            Some(compiled) => (deserialize_module(engine, &compiled)?, false),
            None => (
                Module::new(engine, bytes)
                    .anyhow()
                    .context("the core module does not compile")?,
                true,
            ),
        };
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
            .instantiate_pre(&module)
            .anyhow()
            .context("the WASI command imports something other than wasi_snapshot_preview1")?;
        if fresh {
            self.write_compiled(
                digest,
                &module
                    .serialize()
                    .anyhow()
                    .context("cannot serialize the compiled module")?,
            )?;
        }
        Ok(Artifact {
            digest: digest.to_string(),
            kind: ArtifactKind::Command,
            component: None,
            command: Some(CommandProgram::Module(pre)),
        })
    }

    /// Reads a cached compilation if it exists and its checksum matches.
    fn read_compiled(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let path = self.compiled_path(digest);
        let Ok(bytes) = crate::files::read_bounded(&path, Self::MAX_COMPILED_BYTES) else {
            return Ok(None);
        };
        let expected =
            crate::files::read_text_bounded(&checksum_path(&path), 1024).unwrap_or_default();
        if expected.trim() != sha256_hex(&bytes) {
            tracing::warn!(path = %path.display(), "cached compilation is damaged; compiling again");
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    fn write_compiled(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.compiled_path(digest);
        write_atomically(&checksum_path(&path), sha256_hex(bytes).as_bytes())?;
        write_atomically(&path, bytes)
    }
}

fn checksum_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Loads a component compiled by this engine.
#[allow(unsafe_code)]
fn deserialize_component(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Component> {
    // SAFETY: Wasmtime requires that the bytes come from `Component::serialize` of a
    // compatible engine. They do: the agent wrote them itself into its private state
    // directory, under this engine's fingerprint, and `read_compiled` checked them against
    // the checksum written beside them, so neither truncation nor bit rot gets here.
    unsafe { Component::deserialize(engine, bytes) }
        .anyhow()
        .context("cannot load the cached compiled component")
}

/// Loads a core module compiled by this engine.
#[allow(unsafe_code)]
fn deserialize_module(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Module> {
    // SAFETY: as for `deserialize_component`: bytes written by this agent with
    // `Module::serialize` for this engine's fingerprint and verified against their checksum.
    unsafe { Module::deserialize(engine, bytes) }
        .anyhow()
        .context("cannot load the cached compiled module")
}

/// Writes `bytes` to `path` (mode 0600) so that a crash leaves either the old file or the new
/// one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .context("artifact path has no parent directory")?;
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1
        .write_all(bytes)
        .with_context(|| format!("cannot write {}", tmp.0.display()))?;
    tmp.1
        .sync_all()
        .with_context(|| format!("cannot sync {}", tmp.0.display()))?;
    fs::rename(&tmp.0, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> Result<(PathBuf, fs::File)> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("artifact");
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::wasm::EngineOptions;

    fn store(dir: &Path) -> Arc<ArtifactStore> {
        let engine = Arc::new(
            WasmEngine::new(EngineOptions {
                max_instances: 4,
                ..EngineOptions::default()
            })
            .expect("engine builds"),
        );
        Arc::new(ArtifactStore::open(dir, engine).expect("store opens"))
    }

    #[tokio::test]
    async fn a_component_is_compiled_once_and_reloaded_from_its_cached_compilation() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = crate::embedded::COUNTER.to_vec();
        let digest = sha256_hex(&bytes);
        let first = store(dir.path());
        let artifact = first
            .add(bytes.clone())
            .await
            .expect("counter is a device function");
        assert_eq!(artifact.kind(), ArtifactKind::Component);
        let compiled = first.compiled_path(&digest);
        assert!(compiled.is_file(), "the compilation is cached on disk");
        assert!(first.contains(&digest), "the source is kept by digest");
        let stamp = fs::metadata(&compiled).unwrap().modified().unwrap();

        // A new agent on the same directory loads the cached compilation by digest.
        let second = store(dir.path());
        let loaded = second.load(&digest).await.expect("loads by digest");
        assert_eq!(loaded.digest(), digest);
        assert_eq!(
            fs::metadata(&compiled).unwrap().modified().unwrap(),
            stamp,
            "not recompiled"
        );
    }

    #[tokio::test]
    async fn a_damaged_cached_compilation_is_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = crate::embedded::COUNTER.to_vec();
        let digest = sha256_hex(&bytes);
        let first = store(dir.path());
        first.add(bytes.clone()).await.unwrap();
        let compiled = first.compiled_path(&digest);
        let mut damaged = fs::read(&compiled).unwrap();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0xff;
        fs::write(&compiled, &damaged).unwrap();

        let second = store(dir.path());
        let artifact = second
            .load(&digest)
            .await
            .expect("recompiled from the source");
        assert_eq!(artifact.kind(), ArtifactKind::Component);
        assert_ne!(
            fs::read(&compiled).unwrap(),
            damaged,
            "the damaged file was replaced"
        );
    }

    #[tokio::test]
    async fn a_damaged_source_is_refused_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = crate::embedded::COUNTER.to_vec();
        let digest = sha256_hex(&bytes);
        store(dir.path()).add(bytes).await.unwrap();
        fs::write(
            dir.path().join(format!("{digest}.wasm")),
            b"\0asm\x0d\0\x01\0junk",
        )
        .unwrap();
        let err = store(dir.path())
            .load(&digest)
            .await
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }

    #[tokio::test]
    async fn a_wasi_cli_component_is_a_command_that_prints_and_exits_with_its_code() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = fs::read(crate::embedded::guest_path("hello-wasi-cli").unwrap()).unwrap();
        let store = store(dir.path());
        let artifact = store
            .add(bytes)
            .await
            .expect("a wasi:cli/run component loads");
        assert_eq!(artifact.kind(), ArtifactKind::Command);
        let program = artifact.command().expect("a command program").clone();
        assert_eq!(program.kind_name(), "wasi-cli");

        let log = crate::logs::LogHub::new(crate::logs::LogOptions::default());
        let mut config = std::collections::BTreeMap::new();
        config.insert("greeting".to_string(), "hi".to_string());
        let run = |config: std::collections::BTreeMap<String, String>| {
            let program = program.clone();
            let engine = store.engine().engine().clone();
            let log = &log;
            async move {
                super::super::command::run_command(
                    &engine,
                    program,
                    "hello",
                    super::super::command::CommandInput {
                        config: &config,
                        args: &[],
                        env: &std::collections::BTreeMap::new(),
                    },
                    log,
                    16 << 20,
                    std::time::Duration::from_secs(10),
                )
                .await
            }
        };
        assert_eq!(run(config.clone()).await, Ok(0));
        let lines: Vec<String> = log
            .recent("hello", 64)
            .into_iter()
            .map(|l| l.message)
            .collect();
        assert!(lines.iter().any(|l| l == "hello from wasi"), "{lines:?}");
        assert!(lines.iter().any(|l| l == "LICHEN_GREETING=hi"), "{lines:?}");
        // WASI 0.2's `wasi:cli/exit` carries ok or err only: `exit(3)` reaches the host as 1.
        config.insert("exit".to_string(), "3".to_string());
        assert_eq!(
            run(config).await,
            Ok(1),
            "a failing exit comes through wasi:cli/exit"
        );
    }

    #[tokio::test]
    async fn a_component_that_is_neither_kind_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = wat::parse_str("(component)").unwrap();
        let err = store(dir.path()).add(bytes).await.err().expect("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("neither a device function") && text.contains("wasi:cli/run"),
            "{text}"
        );
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing stored"
        );
    }
}
