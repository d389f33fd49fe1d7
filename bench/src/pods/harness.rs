//! The pod benchmark's fixture: the programs it needs, a `lichen run` agent serving the task
//! API, and a containerd of its own (own root, state, socket and config) with the `ctr` calls the
//! figures time.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::image::image_tar;
use super::{DEADLINE, LINE_BYTES};

/// The programs the benchmark runs.
pub(super) struct Tools {
    lichen: PathBuf,
    pub(super) shim_dir: PathBuf,
    pub(super) busybox: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|file| file.is_file())
    })
}

impl Tools {
    pub(super) fn find() -> Result<Self> {
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            on_path(tool).with_context(|| {
                format!("{tool} is not on PATH (Debian: apt-get install containerd runc)")
            })?;
        }
        let busybox = on_path("busybox")
            .context("busybox is not on PATH (Debian: apt-get install busybox-static)")?;
        let lichen = std::env::current_exe().context("cannot find the lichen binary")?;
        let beside = lichen.with_file_name("containerd-shim-lichen-v1");
        let shim = if beside.is_file() {
            beside
        } else {
            on_path("containerd-shim-lichen-v1").with_context(|| {
                format!(
                    "containerd-shim-lichen-v1 is neither beside {} nor on PATH \
                     (cargo build -p lichen-shim)",
                    lichen.display()
                )
            })?
        };
        let shim_dir = shim
            .parent()
            .context("the shim has a directory")?
            .to_path_buf();
        Ok(Self {
            lichen,
            shim_dir,
            busybox,
        })
    }
}

/// Waits for `ready` with a deadline, polling every 20 ms; `alive` fails when the process
/// that should make it ready has gone.
pub(super) fn wait_for(
    what: &str,
    mut ready: impl FnMut() -> bool,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        alive()?;
        if start.elapsed() > DEADLINE {
            bail!("{what} did not happen within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A child process, killed and reaped when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn still_running(child: &mut Child, name: &str, log: &Path) -> Result<()> {
    if let Some(status) = child.try_wait()? {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail = &text[text.floor_char_boundary(text.len().saturating_sub(3000))..];
        bail!("{name} exited with {status}:\n{tail}");
    }
    Ok(())
}

/// `lichen run` serving the task API.
pub(super) struct Agent {
    child: std::cell::RefCell<Owned>,
    pub(super) task_socket: PathBuf,
    pub(super) log: PathBuf,
}

impl Agent {
    pub(super) fn start(dir: &Path, tools: &Tools) -> Result<Self> {
        let state = dir.join("agent");
        std::fs::create_dir_all(&state)?;
        let task_socket = dir.join("task.sock");
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&tools.lichen)
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .arg("--empty")
            .env(lichen_shim::SOCKET_ENV, &task_socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start lichen run")?;
        let agent = Self {
            child: std::cell::RefCell::new(Owned(child)),
            task_socket,
            log: log_path.clone(),
        };
        wait_for(
            "the agent serving the task API",
            || std::os::unix::net::UnixStream::connect(&agent.task_socket).is_ok(),
            || still_running(&mut agent.child.borrow_mut().0, "lichen run", &log_path),
        )?;
        Ok(agent)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.borrow().0.id()
    }
}

/// containerd with its own root, state, socket and config.
pub(super) struct Containerd {
    _child: Owned,
    dir: PathBuf,
}

impl Containerd {
    pub(super) fn start(dir: &Path, tools: &Tools, task_socket: &Path) -> Result<Self> {
        let d = dir.join("containerd");
        for sub in ["root", "state", "opt"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = d.display()
        );
        std::fs::write(d.join("config.toml"), config)?;
        let path = format!(
            "{}:{}",
            tools.shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log_path = d.join("containerd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Owned(
            Command::new("containerd")
                .arg("--config")
                .arg(d.join("config.toml"))
                .env("PATH", path)
                .env(lichen_shim::SOCKET_ENV, task_socket)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start containerd")?,
        );
        let ctrd = |child: Owned| Self {
            _child: child,
            dir: d.clone(),
        };
        let socket = d.join("containerd.sock");
        wait_for(
            "containerd answering",
            || {
                socket.exists()
                    && Command::new("ctr")
                        .arg("--address")
                        .arg(&socket)
                        .arg("version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            },
            || still_running(&mut child.0, "containerd", &log_path),
        )?;
        Ok(ctrd(child))
    }

    pub(super) fn ctr_command(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .arg("-n")
            .arg("lichen-bench")
            .stdin(Stdio::null());
        command
    }

    pub(super) fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out: Output = self
            .ctr_command()
            .args(args)
            .output()
            .context("cannot run ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {args:?} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds a one-layer image holding `bytes` at `path` and imports it.
    pub(super) fn import(
        &self,
        name: &str,
        path: &str,
        bytes: &[u8],
        entrypoint: &[&str],
    ) -> Result<()> {
        let tar = image_tar(name, path, bytes, entrypoint)?;
        let file = self.dir.join(format!("{}.tar", path.replace('/', "-")));
        std::fs::File::create(&file)?.write_all(&tar)?;
        self.ctr_ok(&[
            "images",
            "import",
            "--all-platforms",
            &file.display().to_string(),
        ])?;
        std::fs::remove_file(&file)?;
        Ok(())
    }

    /// Runs `ctr run --rm ARGS`; returns the time to its first stdout line (which must hold
    /// `marker`) and to its exit.
    pub(super) fn first_output(&self, args: &[&str], marker: &str) -> Result<(Duration, Duration)> {
        let start = Instant::now();
        let mut child = self
            .ctr_command()
            .arg("run")
            .arg("--rm")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ctr")?;
        let stdout = child.stdout.take().context("ctr's stdout is piped")?;
        let mut line = String::new();
        BufReader::new(stdout.take(LINE_BYTES))
            .read_line(&mut line)
            .context("cannot read ctr's stdout")?;
        let first = start.elapsed();
        let out = child.wait_with_output().context("cannot wait for ctr")?;
        let exit = start.elapsed();
        if !line.contains(marker) || !out.status.success() {
            bail!(
                "ctr run {args:?} printed {line:?} and ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((first, exit))
    }

    /// Waits until task `id` is RUNNING; returns its pid.
    pub(super) fn wait_running(&self, id: &str) -> Result<u32> {
        let mut pid = None;
        let mut last = String::new();
        wait_for(
            &format!("task {id} running"),
            || {
                last = self.ctr_ok(&["task", "ls"]).unwrap_or_default();
                pid = last.lines().find_map(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    (cols.first() == Some(&id) && cols.get(2) == Some(&"RUNNING"))
                        .then(|| cols.get(1).and_then(|p| p.parse().ok()))
                        .flatten()
                });
                pid.is_some()
            },
            || Ok(()),
        )
        .with_context(|| format!("ctr task ls: {last}"))?;
        pid.context("a running task has a pid")
    }

    /// Kills, deletes and removes the tasks and containers `ids`.
    pub(super) fn remove_tasks(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.ctr_ok(&["task", "kill", "-s", "SIGKILL", id])?;
        }
        for id in ids {
            let mut stopped = false;
            wait_for(
                &format!("task {id} stopped"),
                || {
                    stopped = self.ctr_ok(&["task", "ls"]).is_ok_and(|t| {
                        t.lines()
                            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
                    });
                    stopped
                },
                || Ok(()),
            )?;
            self.ctr_ok(&["task", "delete", id])?;
            self.ctr_ok(&["containers", "delete", id])?;
        }
        Ok(())
    }
}
