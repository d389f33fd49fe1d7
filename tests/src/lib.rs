//! Harness for Lichen's end-to-end tests: starts the real `lichen` binary as a daemon on a
//! private state directory and socket, talks to it through the CLI and the socket API, and
//! kills it (gracefully or with SIGKILL) to check what survives.

pub mod board;
pub mod broker;
pub mod console;
pub mod containerd;
pub mod guest;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lichen_agent::api::client::Client;
use lichen_agent::api::types::WorkloadStatus;

/// The test binary's profile directory (`target/<profile>`, where cargo puts the workspace's
/// binaries) and cargo's name of that profile (`dev` for `debug`).
pub fn test_profile() -> (PathBuf, String) {
    // Tests run from target/<profile>/deps/.
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => panic!("no profile directory above {}", exe.display()),
    };
    (profile_dir, profile)
}

/// Runs a nested `cargo build --quiet --profile <this test run's> ARGS` on the workspace (a
/// no-op when what it builds is fresh), into `target_dir` when given; fails the test if the
/// build fails. Does nothing when the test does not run under cargo (no `CARGO`).
pub fn nested_cargo_build(args: &[&str], target_dir: Option<&Path>) {
    let Ok(cargo) = std::env::var("CARGO") else {
        return;
    };
    let (_, profile) = test_profile();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(cargo);
    without_test_cargo_env(&mut command);
    command
        .args(["build", "--quiet", "--profile", &profile])
        .args(args)
        .arg("--manifest-path")
        .arg(manifest);
    if let Some(dir) = target_dir {
        command.arg("--target-dir").arg(dir);
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "cannot build {args:?} for the tests");
}

/// Path of the `lichen` binary built by this `cargo test` run. `cargo test -p lichen-tests` or
/// `--test NAME` does not rebuild it, so the tests could run a stale daemon: it is built once
/// per test process (a no-op when it is fresh).
pub fn lichen_bin() -> PathBuf {
    let (profile_dir, _) = test_profile();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| nested_cargo_build(&["-p", "lichen", "--bin", "lichen"], None));
    let bin = profile_dir.join("lichen");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so the binary is built",
        bin.display()
    );
    bin
}

/// Path of binary `bin` of workspace package `package`, built by a nested cargo (a no-op when
/// it is fresh), since `cargo test -p lichen-tests` builds only this package's dependencies'
/// libraries.
pub fn built_bin(package: &str, bin: &str) -> PathBuf {
    let (profile_dir, _) = test_profile();
    nested_cargo_build(&["-p", package, "--bin", bin], None);
    let path = profile_dir.join(bin);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Removes from `command` the variables `cargo test` gives a test (CARGO_MANIFEST_DIR,
/// CARGO_PKG_*, ...), keeping CARGO_HOME, CARGO_TARGET_DIR and CARGO_TERM_*. A nested cargo
/// build must not see them: build scripts that read them (ring's names its symbols after
/// CARGO_PKG_NAME) would rebuild their crate in place, and what the outer `cargo test` built
/// against the old copy (the doc tests run last) would then fail to link.
pub fn without_test_cargo_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("CARGO_")
            && !["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key_text.as_ref())
            && !key_text.starts_with("CARGO_TERM_")
        {
            command.env_remove(&key);
        }
    }
}

/// Path of an example guest built from source by the dev-only `lichen-test-programs` crate:
/// `counter`, `thermostat`, `misbehave`, `hello-wasi`, ... (`lichen_test_programs::ALL`).
pub fn guest(name: &str) -> PathBuf {
    PathBuf::from(lichen_test_programs::path(name).expect("known guest name"))
}

/// A daemon under test, with its own state directory and socket.
pub struct Daemon {
    /// Scratch directory holding state, socket, deployment files.
    pub dir: tempfile::TempDir,
    /// The `lichen` binary it runs (and its CLI verbs use).
    bin: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
    shell_prefix: Option<String>,
}

impl Daemon {
    /// Starts a daemon with no deployment (`--empty`).
    pub fn start() -> Result<Self> {
        Self::start_with(&[], None)
    }

    /// Starts a daemon with extra `run` arguments, optionally through `sh -c "<prefix>; exec
    /// lichen ..."` (for `ulimit`).
    pub fn start_with(extra_args: &[&str], shell_prefix: Option<&str>) -> Result<Self> {
        Self::start_bin(lichen_bin(), extra_args, shell_prefix)
    }

    /// Like [`Daemon::start_with`], running another build of `lichen` (the small-node
    /// flavour); its CLI verbs run that binary too.
    pub fn start_bin(
        bin: PathBuf,
        extra_args: &[&str],
        shell_prefix: Option<&str>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut daemon = Self {
            dir,
            bin,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            shell_prefix: shell_prefix.map(str::to_string),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lichen.sock")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A socket API client.
    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.socket());
        let mut args: Vec<String> = vec![
            "--socket".into(),
            self.socket().display().to_string(),
            "run".into(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ];
        if !self.extra_args.iter().any(|a| a == "--deploy") {
            args.push("--empty".into());
        }
        args.extend(self.extra_args.iter().cloned());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let mut command = match &self.shell_prefix {
            Some(prefix) => {
                let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!(
                    "{prefix}; exec '{}' {}",
                    self.bin.display(),
                    quoted.join(" ")
                ));
                c
            }
            None => {
                let mut c = Command::new(&self.bin);
                c.args(&args);
                c
            }
        };
        // Each daemon serves containerd's Task API on a socket of its own (tests run many
        // daemons at once); a test that exports another one in its shell prefix wins.
        let child = command
            .env("LICHEN_LOG", "info")
            .env(lichen_shim::SOCKET_ENV, self.dir.path().join("task.sock"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start lichen run")?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.socket().exists() && self.cli(&["ps"]).status.success() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "daemon exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("daemon did not become ready in 60 s:\n{}", self.log())
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The daemon's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs a CLI verb against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("the lichen binary runs")
    }

    /// Runs a CLI verb with `--json` and parses its output; fails with the CLI's stderr.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        if !out.status.success() {
            bail!(
                "lichen {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Writes a deployment file into the scratch directory and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("scratch directory is writable");
        path
    }

    /// `lichen deploy` of a deployment text written to `name`.
    pub fn deploy(&self, name: &str, text: &str) -> Output {
        let path = self.write_file(name, text);
        self.cli(&["deploy", path.to_str().expect("utf-8 temp path")])
    }

    /// `ps` as parsed rows.
    pub fn ps(&self) -> Vec<WorkloadStatus> {
        let value = self.cli_json(&["ps"]).expect("ps works");
        serde_json::from_value(value).expect("ps --json gives workload rows")
    }

    /// The `ps` row of one workload.
    pub fn status(&self, name: &str) -> Option<WorkloadStatus> {
        self.ps().into_iter().find(|w| w.name == name)
    }

    /// Waits until `check` holds for the workload's status, or fails with the last status.
    pub fn wait_for(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&WorkloadStatus) -> bool,
    ) -> WorkloadStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.status(name) {
                if check(&status) {
                    return status;
                }
                last = Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "workload {name}: waited 60 s for {what}; last status {last:?}\ndaemon log:\n{}",
            self.log()
        );
    }

    /// A key of a workload's default bucket, read through `lichen kv`.
    pub fn kv(&self, workload: &str, key: &str) -> Option<String> {
        let value = self.cli_json(&["kv", workload]).ok()?;
        value.as_array()?.iter().find_map(|e| {
            (e["bucket"] == "default" && e["key"] == key)
                .then(|| e["value"].as_str().unwrap_or_default().to_string())
        })
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.kill()?;
            child.wait()?;
            bail!("daemon did not stop on SIGTERM within 30 s");
        }
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no chance to clean up).
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the daemon again on the same state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }
}

impl Drop for Daemon {
    /// A test that ends (or panics) with the daemon still up stops it with SIGTERM, so its
    /// containers and microVMs are stopped too; SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A deployment with one workload, as TOML.
pub fn one_workload(name: &str, module: &Path, extra: &str) -> String {
    format!(
        "[[workloads]]\nname = \"{name}\"\nmodule = \"{}\"\n{extra}\n",
        module.display()
    )
}

/// Text of a process's stdout and stderr.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the `lichen` binary with `args` (verbs that need no daemon, such as `hub`).
pub fn lichen(args: &[&str]) -> Output {
    Command::new(lichen_bin())
        .args(args)
        .output()
        .expect("the lichen binary runs")
}
