//! The artifact store: Wasm binaries kept by sha256 digest, each precompiled once for this
//! engine and cached on disk (`<digest>.<engine fingerprint>.cwasm`) and in memory.
//!
//! Files are written 0600 and only once a binary is accepted (it compiles and links against
//! the world), so a refused module leaves nothing behind. What no deployment uses is removed by
//! [`ArtifactStore::collect_garbage`], except binaries added on purpose for a deployment to come
//! ([`ArtifactStore::add`]: hub transfers, bundles), which are kept until a deployment uses them
//! or the agent restarts.
//!
//! Compiling and linking a binary is in `artifacts/compile.rs`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use lichen_host_apis::DeviceFunctionPre;
use wasmtime::Precompiled;

use super::command::CommandProgram;
use super::compiler::{deserialize_component_file, deserialize_module_file};
use super::engine::WasmEngine;
use super::instance::InstanceData;
use crate::util::write_atomically;

mod compile;

/// Where one precompiled load's time went ([`ArtifactStore::time_compiled_load`]).
#[derive(Debug, Clone, Copy)]
pub struct LoadPhases {
    /// The compiled file's identity check against its record (stat, read the record).
    pub check: std::time::Duration,
    /// Wasmtime's `Component::deserialize_file`: map the file, check its header, register
    /// its code.
    pub map: std::time::Duration,
    /// Linking against the device-function world (`instantiate_pre`, the exports lookup).
    pub link: std::time::Duration,
}

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
    counts: Counters,
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
            counts: Counters::default(),
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

    /// Loads the artifact with this digest from the store: from its compiled file alone when
    /// it has a trusted one (mapped, the source not read), else from the source.
    pub async fn load(self: &Arc<Self>, digest: &str) -> Result<Arc<Artifact>> {
        if let Some(artifact) = self.cached(digest) {
            return Ok(artifact);
        }
        if lichen_sync::is_digest(digest) {
            let store = self.clone();
            let d = digest.to_owned();
            // In place where it can be: mapping a compiled file is quick, and the hand-off
            // to the blocking pool was a third of the load.
            let compiled = crate::util::run_blocking(move || store.load_compiled_blocking(&d))
                .await
                .context("the artifact loading task failed")?;
            if let Some(artifact) = compiled {
                return Ok(artifact);
            }
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

    /// Loads `digest` from its compiled file alone (the source is not read): a component, else
    /// a core module. `None` when there is no trusted compiled file or it does not load.
    fn load_compiled_blocking(&self, digest: &str) -> Option<Arc<Artifact>> {
        let path = self.compiled_ready(digest)?;
        let engine = self.engine.engine();
        let artifact = match deserialize_component_file(engine, &path) {
            Ok(component) => self.link_component(digest, &component),
            Err(component_err) => match deserialize_module_file(engine, &path) {
                Ok(module) => self.link_module(digest, &module),
                Err(_) => Err(component_err),
            },
        };
        match artifact {
            Ok(artifact) => {
                self.counts
                    .precompiled_loads
                    .fetch_add(1, Ordering::Relaxed);
                let artifact = Arc::new(artifact);
                if let Ok(mut loaded) = self.loaded.lock() {
                    loaded.insert(digest.to_owned(), artifact.clone());
                }
                Some(artifact)
            }
            Err(e) => {
                tracing::warn!(module = %digest, path = %path.display(), "the compiled file does not load ({e:#}); using the source");
                None
            }
        }
    }

    /// Loads `digest`'s compiled component file as [`ArtifactStore::load`] does at start, on
    /// the calling thread and without caching it, timing each phase: for `lichen bench
    /// startup`, which says where a precompiled load's time goes.
    pub fn time_compiled_load(&self, digest: &str) -> Result<LoadPhases> {
        let started = std::time::Instant::now();
        let path = self.compiled_ready(digest).with_context(|| {
            format!("no trusted compiled file for module sha256:{digest} in the store")
        })?;
        let checked = std::time::Instant::now();
        let component = deserialize_component_file(self.engine.engine(), &path)?;
        let mapped = std::time::Instant::now();
        self.link_component(digest, &component)?;
        let linked = std::time::Instant::now();
        Ok(LoadPhases {
            check: checked - started,
            map: mapped - checked,
            link: linked - mapped,
        })
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

    /// The compiled file of `digest` if it is the one this agent wrote: the same size, inode,
    /// modification and change times as recorded beside it when it was written, checked
    /// without reading it. A file whose identity changed since is hashed once: if it still
    /// has the recorded sha256 the record is renewed, else it is damaged and not used.
    fn compiled_ready(&self, digest: &str) -> Option<PathBuf> {
        let path = self.compiled_path(digest);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.len() > Self::MAX_COMPILED_BYTES {
            return None;
        }
        let record = crate::files::read_text_bounded(&checksum_path(&path), 1024).ok()?;
        let mut fields = record.split_whitespace();
        let sha = fields.next()?.to_owned();
        if fields.next() == Some(identity(&meta).as_str()) {
            return Some(path);
        }
        let bytes = crate::files::read_bounded(&path, Self::MAX_COMPILED_BYTES).ok()?;
        if sha256_hex(&bytes) != sha {
            tracing::warn!(path = %path.display(), "compiled file is damaged (its sha256 is not the one recorded when it was written); not using it");
            return None;
        }
        record_compiled(&path, &sha).ok()?;
        Some(path)
    }

    fn write_compiled(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.compiled_path(digest);
        write_atomically(&path, bytes)?;
        record_compiled(&path, &sha256_hex(bytes))
    }

    /// Tells whether this node has a trusted compiled form of `digest` for its engine.
    pub fn has_compiled(&self, digest: &str) -> bool {
        self.compiled_ready(digest).is_some()
    }

    /// How many modules this store compiled, and how many it loaded from compiled files.
    pub fn counts(&self) -> CompileCounts {
        CompileCounts {
            compiled: self.counts.compiled.load(Ordering::Relaxed),
            precompiled_loads: self.counts.precompiled_loads.load(Ordering::Relaxed),
        }
    }

    /// Keeps `digest` (its files, and its loaded form) through collections until
    /// [`unkeep`](Self::unkeep) or until a deployment uses it, like an [`add`](Self::add)ed one.
    pub fn keep(&self, digest: &str) {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_owned());
    }

    /// Stops keeping `digest`: the next collection removes it unless a deployment uses it.
    pub fn unkeep(&self, digest: &str) {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
    }

    /// Stores a source module for a deployment to come without compiling it: its compiled
    /// form comes beside it ([`add_precompiled`](Self::add_precompiled)). Kept like
    /// [`add`](Self::add).
    pub async fn add_source(self: &Arc<Self>, bytes: Vec<u8>) -> Result<String> {
        Self::precompiled_kind(&bytes)?;
        let digest = sha256_hex(&bytes);
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.clone());
        let store = self.clone();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || {
            if store.contains(&d) {
                return Ok(());
            }
            write_atomically(&store.source_path(&d), &bytes)
        })
        .await
        .context("the artifact writing task failed")??;
        Ok(digest)
    }

    /// Stores `bytes`, the compiled form of source module `module` for this node's engine,
    /// already checked against the sha256 its signed desired state names: written once with
    /// its record ([`compiled_ready`](Self::compiled_ready)), then mapped once to check that
    /// it loads into this engine. One that does not load is removed and refused.
    pub async fn add_precompiled(self: &Arc<Self>, module: &str, bytes: Vec<u8>) -> Result<()> {
        anyhow::ensure!(
            lichen_sync::is_digest(module),
            "{module:?} is not a sha256 digest"
        );
        anyhow::ensure!(
            bytes.len() as u64 <= Self::MAX_COMPILED_BYTES,
            "the compiled artifact is {} bytes, over the {}-byte limit",
            bytes.len(),
            Self::MAX_COMPILED_BYTES
        );
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(module.to_owned());
        let store = self.clone();
        let module = module.to_owned();
        tokio::task::spawn_blocking(move || {
            let path = store.compiled_path(&module);
            store.write_compiled(&module, &bytes)?;
            drop(bytes);
            let engine = store.engine.engine();
            let loads = deserialize_component_file(engine, &path)
                .map(drop)
                .or_else(|e| deserialize_module_file(engine, &path).map(drop).map_err(|_| e));
            if let Err(e) = loads {
                let _ = fs::remove_file(checksum_path(&path));
                let _ = fs::remove_file(&path);
                return Err(e.context(format!(
                    "the compiled artifact for module sha256:{module} does not load into this engine (target {}, fingerprint {})",
                    store.engine.target(),
                    store.engine.fingerprint()
                )));
            }
            if let Ok(mut loaded) = store.loaded.lock() {
                loaded.remove(&module);
            }
            Ok(())
        })
        .await
        .context("the artifact writing task failed")?
    }
}

/// Whether this agent was built with a compiler (Cranelift, the cargo feature `compiler`).
pub const COMPILER: bool = cfg!(feature = "compiler");

/// Modules compiled and compiled files loaded by an [`ArtifactStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileCounts {
    /// Modules compiled on this node.
    pub compiled: u64,
    /// Modules loaded from a compiled file (precompiled on the hub, or cached here).
    pub precompiled_loads: u64,
}

#[derive(Default)]
struct Counters {
    compiled: AtomicU64,
    precompiled_loads: AtomicU64,
}

/// What identifies one written file: size, inode, modification and change times (ns).
fn identity(meta: &fs::Metadata) -> String {
    format!(
        "{}:{}:{}.{}:{}.{}",
        meta.len(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// Records beside a compiled file its sha256 and identity, once it is in place.
fn record_compiled(path: &Path, sha: &str) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    write_atomically(
        &checksum_path(path),
        format!("{sha} {}\n", identity(&meta)).as_bytes(),
    )
}

fn checksum_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests;
