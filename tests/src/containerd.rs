//! Harness for the containerd tests: a real containerd (Debian's 1.6) started with its own
//! root, state, socket and config (no systemd), offline OCI images built by the test, `ctr`
//! to drive it, and the Lichen shim binary on containerd's `PATH`.
//!
//! The real agent (`lichen run`, [`crate::Daemon`]) serves containerd's Task API in the tests
//! of pods; [`FakeAgentServer`] serves it from the test process with
//! `lichen_shim::testing::FakeAgent` (a named stand-in that runs no Wasm) for the tests of the
//! containerd side alone (the agent going away and coming back on cue, the shim's refusals).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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

/// Fails unless containerd and ctr run, or returns `false` when `LICHEN_TEST_ALLOW_MISSING`
/// lists `containerd` (CI never sets it; see [`crate::tools`]).
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
    crate::tools::missing("containerd", &format!("{missing:?} not installed"))
}

pub use lichen_shim::layout::{ImageFile, ImageSpec, build_image_tar, digest};

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

/// A WASI preview-1 command module that prints `sleeping` and then sleeps a second at a time
/// until it is stopped: a long-running pod.
pub fn sleeper_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 200) "sleeping\n")
            (func (export "_start")
              (i32.store (i32.const 100) (i32.const 200))
              (i32.store (i32.const 104) (i32.const 9))
              (drop (call $fd_write (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 108)))
              (i32.store8 (i32.const 8) (i32.const 0))
              (i32.store (i32.const 16) (i32.const 1))
              (i64.store (i32.const 24) (i64.const 1000000000))
              (loop $forever
                (drop (call $poll (i32.const 0) (i32.const 304) (i32.const 1) (i32.const 400)))
                (br $forever))))"#,
    )
    .expect("the sleeper module is valid WAT")
}

/// A WASI preview-1 command module that prints `hello from a wasm pod` and exits with `code`.
pub fn exit_wasm(code: u8) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "hello from a wasm pod\n")
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 16))
              (i32.store (i32.const 4) (i32.const 22))
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
              (call $exit (i32.const {code}))))"#
    ))
    .expect("the exit module is valid WAT")
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
