//! The real-kernel test guest (`images/test-guest/`): builds it (or reuses the cached one),
//! boots it under QEMU with TCG and drives the shell loop its `/init` runs on the serial
//! console, one command per line.
//!
//! Each command is sent as `{ CMD ; } </dev/null 2>&1; printf '\n@@N:%d@@\n' $?`; the guest's
//! console has echo off, so everything up to the marker is the command's output and the marker
//! carries its exit status. The whole console stream is also kept in `console.log` in a
//! scratch directory, which a failing test prints the tail of.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::console::SerialConsole;

/// Longest wait for the guest to boot or a command to finish: only a guard against a hung
/// QEMU, not a speed requirement (TCG on a loaded 2-core machine is slow).
const HANG_GUARD: Duration = Duration::from_secs(600);
/// Longest [`Guest::wait_until`] polls for a state: a guard against waiting forever for
/// something that will not happen, far above what TCG needs under load.
const POLL_GUARD: Duration = Duration::from_secs(180);

/// What `images/test-guest/build.sh` made: a kernel, an initramfs and their command line.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The directory holding `vmlinuz`, `initramfs.gz` and `cmdline`.
    pub dir: PathBuf,
    /// How long the build (or the cache check) took.
    pub build_time: Duration,
}

/// Builds the guest with these device functions (each packed as `/guest/<file name>`, `_`
/// turned into `-`), or finds it in the cache.
pub fn build(wasm: &[(&str, PathBuf)]) -> Result<GuestImage> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/test-guest/build.sh");
    // build.sh names each file after its source path: link them under their workload names.
    let staging = tempfile::tempdir().context("cannot make a staging directory")?;
    let mut args = Vec::new();
    for (name, path) in wasm {
        let link = staging.path().join(format!("{name}.wasm"));
        std::os::unix::fs::symlink(path, &link)
            .with_context(|| format!("cannot link {}", path.display()))?;
        args.push(link);
    }
    let started = Instant::now();
    let mut command = Command::new(&script);
    // The static lichen is built by a nested cargo: see without_test_cargo_env.
    crate::without_test_cargo_env(&mut command);
    let out = command
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let build_time = started.elapsed();
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    for file in ["vmlinuz", "initramfs.gz", "cmdline"] {
        if !dir.join(file).is_file() {
            bail!(
                "{} printed {}, which has no {file}",
                script.display(),
                dir.display()
            );
        }
    }
    Ok(GuestImage { dir, build_time })
}

/// A booted guest. Dropping it kills QEMU (by its PID, through the child handle).
pub struct Guest {
    child: Child,
    stdin: ChildStdin,
    console: SerialConsole,
    /// Where the console has been read up to by [`Guest::run`].
    consumed: usize,
    seq: u64,
    scratch: tempfile::TempDir,
    /// From starting QEMU to the guest's `LICHEN-GUEST-READY` line.
    pub boot_time: Duration,
    /// The kernel release the guest printed when ready.
    pub kernel: String,
}

impl Guest {
    /// Boots `image` under QEMU (microvm, TCG) and waits until its init is ready for
    /// commands; fails with the console's tail if init reported an error or QEMU died.
    pub fn boot(image: &GuestImage) -> Result<Guest> {
        let scratch = tempfile::tempdir().context("cannot make a scratch directory")?;
        let cmdline = std::fs::read_to_string(image.dir.join("cmdline"))
            .context("cannot read the guest's cmdline")?;
        let started = Instant::now();
        // TCG: /dev/kvm here is KVM-PVM, where stock kernels hang. microvm has everything the
        // guest needs (a serial port, an initramfs); no disk, no network.
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "microvm", "-m", "512", "-smp", "1"])
            .args([
                "-nographic",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initramfs.gz"))
            .arg("-append")
            .arg(cmdline.trim())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-x86_64 (scripts/install-deps installs it)")?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let log = std::fs::File::create(scratch.path().join("console.log"))
            .context("cannot create console.log")?;
        let console = SerialConsole::of_child(&mut child, &log)?;
        let mut guest = Guest {
            child,
            stdin,
            console,
            consumed: 0,
            seq: 0,
            scratch,
            boot_time: Duration::ZERO,
            kernel: String::new(),
        };
        let ready = guest.wait_for_text("LICHEN-GUEST-READY ", "the guest's init to be ready")?;
        guest.boot_time = started.elapsed();
        guest.wait_for_text_from(ready, "\n", "the end of the ready line")?;
        let text = guest.console.text();
        let errors: Vec<&str> = text[..ready]
            .lines()
            .filter(|l| l.contains("LICHEN-GUEST-ERROR"))
            .collect();
        if !errors.is_empty() {
            bail!("the guest's init failed:\n{}", errors.join("\n"));
        }
        guest.kernel = text[ready..]
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("LICHEN-GUEST-READY ")
            .trim()
            .to_string();
        guest.consumed = text.len();
        Ok(guest)
    }

    /// Waits until the console holds `needle` after what was consumed; returns its offset.
    fn wait_for_text(&self, needle: &str, what: &str) -> Result<usize> {
        self.wait_for_text_from(self.consumed, needle, what)
    }

    /// Waits until the console holds `needle` at or after offset `from`; returns its offset.
    fn wait_for_text_from(&self, from: usize, needle: &str, what: &str) -> Result<usize> {
        self.console.wait(what, HANG_GUARD, |text| {
            text[from..].find(needle).map(|at| from + at)
        })
    }

    /// Runs one shell command line in the guest; returns its exit status and output
    /// (stdout and stderr together, without the last newline).
    pub fn run(&mut self, command: &str) -> Result<(i32, String)> {
        assert!(!command.contains('\n'), "one line per command: {command:?}");
        self.seq += 1;
        let seq = self.seq;
        writeln!(
            self.stdin,
            "{{ {command} ; }} </dev/null 2>&1; printf '\\n@@{seq}:%d@@\\n' $?"
        )
        .and_then(|()| self.stdin.flush())
        .with_context(|| format!("cannot send {command:?} to the guest"))?;
        let marker = format!("\n@@{seq}:");
        let at = self.wait_for_text(&marker, &format!("the end of {command:?}"))?;
        let end = self.wait_for_text("@@\n", &format!("the status of {command:?}"))?;
        let text = self.console.text();
        let output = text[self.consumed..at].to_string();
        let status_text = &text[at + marker.len()..];
        let status_end = status_text.find("@@").unwrap_or(0);
        let status: i32 = status_text[..status_end]
            .parse()
            .with_context(|| format!("bad status marker after {command:?}"))?;
        self.consumed = end.max(at) + 3;
        Ok((status, output))
    }

    /// Runs a command that must succeed; returns its output trimmed.
    pub fn sh(&mut self, command: &str) -> Result<String> {
        crate::console::sh_ok(|c| self.run(c), command)
    }

    /// Runs `command` every 200 ms until `done` holds for its output; returns that output.
    /// `what` says what is awaited, for the error if it never comes.
    pub fn wait_until(
        &mut self,
        command: &str,
        what: &str,
        done: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        crate::console::poll_until(
            |c| self.run(c),
            command,
            what,
            done,
            POLL_GUARD,
            Duration::from_millis(200),
        )
    }

    /// The last `bytes` of the console, for failure messages.
    pub fn console_tail(&self, bytes: usize) -> String {
        self.console.tail(bytes)
    }

    /// The scratch directory holding `console.log`.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SIGKILL to QEMU's PID; then reap it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
