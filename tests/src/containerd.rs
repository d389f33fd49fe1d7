//! Harness for the containerd tests: a real containerd (Debian's 1.6) started with its own
//! root, state, socket and config (no systemd), offline OCI images built by the test, `ctr`
//! to drive it, and the Lichen shim binary on containerd's `PATH`.
//!
//! Until the agent serves containerd's Task API itself, [`FakeAgentServer`] serves it from the
//! test process with `lichen_shim::testing::FakeAgent` (a named stand-in that runs no Wasm).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Longest wait for containerd or a task to reach a state.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// The runtime type of Lichen's shim.
pub const RUNTIME: &str = "io.containerd.lichen.v1";
/// The image name of the sandbox ("pause") image the tests import.
pub const PAUSE_IMAGE: &str = "lichen.test/pause:1";

/// Path of `containerd-shim-lichen-v1`, built (once per test process) by a nested cargo.
pub fn shim_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| crate::built_bin("lichen-shim", "containerd-shim-lichen-v1"))
        .clone()
}

/// Fails unless `tool` is on PATH, or returns `false` when `LICHEN_SKIP_CONTAINERD=1` says a
/// machine without containerd may skip (CI never sets it).
pub fn tools_present() -> bool {
    let missing: Vec<&str> = ["containerd", "ctr"]
        .into_iter()
        .filter(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("LICHEN_SKIP_CONTAINERD").as_deref() == Ok("1") {
        eprintln!("skipping: {missing:?} not installed and LICHEN_SKIP_CONTAINERD=1");
        return false;
    }
    panic!(
        "{missing:?} not installed: run scripts/install-deps (or set LICHEN_SKIP_CONTAINERD=1 to skip)"
    );
}

/// One file of an image layer.
pub struct ImageFile {
    /// Path inside the image, without the leading `/`.
    pub path: String,
    /// Contents.
    pub bytes: Vec<u8>,
    /// Mode bits.
    pub mode: u32,
}

impl ImageFile {
    /// A file of mode 0755.
    pub fn new(path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.trim_start_matches('/').to_string(),
            bytes: bytes.into(),
            mode: 0o755,
        }
    }
}

/// An image to build: one layer, an entrypoint, a command, an environment.
pub struct ImageSpec {
    /// Reference, e.g. `lichen.test/hello:1`.
    pub name: String,
    /// The layer's files.
    pub files: Vec<ImageFile>,
    /// `Entrypoint` of the image config.
    pub entrypoint: Vec<String>,
    /// `Cmd` of the image config.
    pub cmd: Vec<String>,
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn append(builder: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, bytes)?;
    Ok(())
}

/// Builds `spec` as an OCI image layout tarball, offline (nothing is pulled).
pub fn build_image_tar(spec: &ImageSpec) -> Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for file in &spec.files {
        let mut parent = Path::new(&file.path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    for dir in &dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        layer.append_data(&mut header, format!("{}/", dir.display()), std::io::empty())?;
    }
    for file in &spec.files {
        append(&mut layer, &file.path, &file.bytes, file.mode)?;
    }
    let layer = layer.into_inner()?;
    let layer_digest = digest(&layer);
    let config = serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len() }],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    })
    .to_string()
    .into_bytes();

    let mut out = tar::Builder::new(Vec::new());
    append(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut out, "index.json", &index, 0o644)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        append(&mut out, &name, blob, 0o644)?;
    }
    Ok(out.into_inner()?)
}

/// A WASI preview-1 command module that prints `hello from a wasm pod` and exits with 0:
/// what the real agent runs; the stand-in only checks its magic.
pub fn hello_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "hello from a wasm pod\n")
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 16))
              (i32.store (i32.const 4) (i32.const 22))
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .expect("the hello module is valid WAT")
}

/// A containerd daemon of the test's own.
pub struct Containerd {
    /// Root of everything it writes: config, root, state, sockets, FIFOs.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    namespace: String,
}

impl Containerd {
    /// Starts containerd with the CRI plugin disabled (the `ctr` tests) or enabled with a
    /// `lichen` runtime handler and the local pause image (the CRI tests). `task_socket` is
    /// the agent's task server, passed to the shim through containerd's environment.
    pub fn start(task_socket: &Path, cri: bool) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("ctrd").tempdir_in("/tmp")?;
        let d = dir.path();
        for sub in ["root", "state", "opt", "cni/conf", "cni/bin"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let disabled = if cri {
            ""
        } else {
            r#""io.containerd.grpc.v1.cri","#
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled} "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{d}/containerd.sock"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.lichen]
      runtime_type = "{RUNTIME}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            d = d.display(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        let shim_dir = shim_bin()
            .parent()
            .expect("the shim binary has a directory")
            .to_path_buf();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env(lichen_shim::SOCKET_ENV, task_socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start containerd")?;
        let mut containerd = Self {
            dir,
            child: Some(child),
            namespace: "lichen-test".into(),
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The namespace `ctr` uses.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Uses another namespace for `ctr` (CRI's is `k8s.io`).
    pub fn set_namespace(&mut self, namespace: &str) {
        self.namespace = namespace.to_string();
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.socket().exists() && self.ctr(&["version"])?.status.success() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited with {status}:\n{}", self.log_tail());
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "containerd did not answer within {DEADLINE:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of containerd's log.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        text[text.floor_char_boundary(start)..].to_string()
    }

    /// Runs `ctr --address SOCKET -n NAMESPACE ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .arg("-n")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ctr")
    }

    /// Runs `ctr` and fails unless it succeeds; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "ctr {args:?} failed with {}: {}\ncontainerd log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds `spec` and imports it with `ctr images import`.
    pub fn import(&self, spec: &ImageSpec) -> Result<()> {
        let tar = build_image_tar(spec)?;
        let path = self
            .dir
            .path()
            .join(format!("{}.tar", digest(spec.name.as_bytes())));
        std::fs::File::create(&path)?.write_all(&tar)?;
        let out = self.ctr_ok(&[
            "images",
            "import",
            "--all-platforms",
            path.to_str().expect("utf-8 path"),
        ])?;
        let listed = self.ctr_ok(&["images", "ls", "-q"])?;
        if !listed.lines().any(|l| l.trim() == spec.name) {
            bail!(
                "imported {}, but `ctr images ls` lists {listed:?} ({out})",
                spec.name
            );
        }
        Ok(())
    }

    /// The status column of `ctr task ls` for `id` (`RUNNING`, `STOPPED`...), if listed.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        let out = self.ctr_ok(&["task", "ls"])?;
        Ok(out.lines().skip(1).find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        }))
    }

    /// Waits until `ready` holds for the task's status, with [`DEADLINE`].
    pub fn wait_task(
        &self,
        id: &str,
        what: &str,
        ready: impl Fn(Option<&str>) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let status = self.task_status(id)?;
            if ready(status.as_deref()) {
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "task {id} did not become {what} within {DEADLINE:?} (status {status:?}):\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Mount points under this containerd's directory still mounted.
    pub fn mounts_left(&self) -> Vec<String> {
        let root = self.dir.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = rustix_kill(child.id());
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() && start.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // What a failed test left mounted (snapshots, rootfs) would keep the directory busy.
        for mount in self.mounts_left().into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }
}

fn rustix_kill(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// The task server with the stand-in agent, on its own tokio runtime and thread, so tests can
/// drive `ctr` with blocking commands. Stopping it closes containerd's connections, which is
/// what containerd sees when the agent restarts.
pub struct FakeAgentServer {
    socket: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<lichen_shim::TaskServer>,
    /// The stand-in agent.
    pub agent: Arc<lichen_shim::testing::FakeAgent>,
}

/// The stand-in agent's instance slot: 64 MiB of linear memory.
pub const FAKE_SLOT_BYTES: u64 = 64 << 20;

impl FakeAgentServer {
    /// Serves on `socket`.
    pub fn start(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let agent = Arc::new(lichen_shim::testing::FakeAgent::new(FAKE_SLOT_BYTES));
        let server = runtime.block_on(async {
            let service = Arc::new(lichen_shim::TaskService::new(agent.clone()));
            lichen_shim::serve(socket, service).await
        })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            runtime: Some(runtime),
            server: Some(server),
            agent,
        })
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving and forgets every task, as an agent that exits does.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let (Some(runtime), Some(server)) = (self.runtime.as_ref(), self.server.take()) {
            runtime.block_on(server.shutdown());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for FakeAgentServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
