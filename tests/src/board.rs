//! A Lichen board image (`images/build`) booted under QEMU with TCG: builds it (or finds it in
//! the cache), boots a private copy of its disk, drives the shell on its serial console, and
//! cuts the power (SIGKILL to QEMU) to boot it again.
//!
//! x86_64 boots `-M q35` with Debian's OVMF (UEFI) and the image's GRUB; arm64 boots
//! `-M virt` with Debian's U-Boot (`qemu_arm64`). TCG: /dev/kvm on the development machines
//! is KVM-PVM, where stock kernels hang. A power cut by SIGKILL keeps whatever QEMU had
//! handed to the host (the disk file lives in the host's page cache), so what it drops is
//! what the guest had not written yet: the guest's own caches.
//!
//! The console: after the board's init prints `lichen-init: ready`, [`Board::shell`] turns
//! the interactive shell there into a command loop without echo; [`Board::run`] then sends
//! `{ CMD ; } </dev/null 2>&1; printf '\n@@N:%d@@\n' $?` and reads the output up to the
//! marker, as `guest.rs` does for the test guest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::console::SerialConsole;

/// Longest wait for a boot step or a command: only a guard against a hung QEMU, not a speed
/// requirement (TCG on a loaded 2-core machine is slow).
pub const HANG_GUARD: Duration = Duration::from_secs(900);

/// Runs `images/build` with `args`; returns the directory it printed.
pub fn build_image(args: &[&str]) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build");
    let mut command = Command::new(&script);
    // The static lichen is built by a nested cargo: see without_test_cargo_env.
    crate::without_test_cargo_env(&mut command);
    let out = command
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!("images/build {} failed ({})", args.join(" "), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !dir.join("rootfs.img").is_file() {
        bail!(
            "images/build printed {}, which has no rootfs.img",
            dir.display()
        );
    }
    Ok(dir)
}

/// A board's disk (a private sparse copy of an image's disk.img) and, optionally, a second
/// disk standing for a USB stick (ext4, read-only in the guest).
pub struct BoardDisk {
    /// `x86_64` or `arm64`.
    pub target: String,
    dir: tempfile::TempDir,
    usb: Option<PathBuf>,
    write_rate: Option<u64>,
}

impl BoardDisk {
    /// Copies `image_dir/disk.img`.
    pub fn new(image_dir: &Path, target: &str) -> Result<BoardDisk> {
        let dir = tempfile::tempdir().context("cannot make a scratch directory")?;
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(image_dir.join("disk.img"))
            .arg(dir.path().join("disk.img"))
            .status()
            .context("cannot run cp")?;
        if !status.success() {
            bail!("cannot copy {}/disk.img", image_dir.display());
        }
        Ok(BoardDisk {
            target: target.to_string(),
            dir,
            usb: None,
            write_rate: None,
        })
    }

    /// Limits the disk's writes to `bytes_per_second` (QEMU's throttling), as slow as an SD
    /// card, so that a power cut can land in the middle of a slot write.
    pub fn write_rate(&mut self, bytes_per_second: u64) {
        self.write_rate = Some(bytes_per_second);
    }

    /// The disk image file.
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// Makes the USB stick: an ext4 image holding `files` as (name in the stick, source).
    pub fn with_usb(&mut self, files: &[(&str, &Path)]) -> Result<()> {
        let staging = self.dir.path().join("usb");
        std::fs::create_dir_all(&staging)?;
        let mut total = 0;
        for (name, source) in files {
            std::fs::copy(source, staging.join(name))
                .with_context(|| format!("cannot copy {}", source.display()))?;
            total += std::fs::metadata(source)?.len();
        }
        let image = self.dir.path().join("usb.img");
        let size_mib = total / (1 << 20) + 32;
        let out = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "usb", "-d"])
            .arg(&staging)
            .arg(&image)
            .arg(format!("{size_mib}M"))
            .output()
            .context("cannot run mke2fs")?;
        if !out.status.success() {
            bail!("mke2fs failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::remove_dir_all(&staging)?;
        self.usb = Some(image);
        Ok(())
    }

    /// Powers the board on: starts QEMU on this disk.
    pub fn boot(&self) -> Result<Board> {
        let mut command = match self.target.as_str() {
            "x86_64" => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-accel",
                    "tcg",
                    "-M",
                    "q35",
                    "-bios",
                    "/usr/share/ovmf/OVMF.fd",
                ]);
                c
            }
            "arm64" => {
                let mut c = Command::new("qemu-system-aarch64");
                c.args(["-accel", "tcg", "-M", "virt", "-cpu", "cortex-a57"])
                    .args(["-bios", "/usr/lib/u-boot/qemu_arm64/u-boot.bin"]);
                c
            }
            other => bail!("unknown target {other}"),
        };
        command
            .args(["-m", "512", "-smp", "1", "-nographic", "-monitor", "none"])
            .args(["-serial", "stdio", "-nic", "none"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio{}",
                self.disk().display(),
                self.write_rate
                    .map(|r| format!(",throttling.bps-write={r}"))
                    .unwrap_or_default()
            ));
        if let Some(usb) = &self.usb {
            command.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                usb.display()
            ));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("console.log"))
            .context("cannot open console.log")?;
        Board::spawn(command, log, self.dir.path().join("console.log"))
    }
}

/// A running board. Dropping it kills QEMU.
pub struct Board {
    child: Child,
    stdin: ChildStdin,
    console: SerialConsole,
    consumed: usize,
    seq: u64,
    started: Instant,
    log: PathBuf,
}

impl Board {
    fn spawn(mut command: Command, log: std::fs::File, log_path: PathBuf) -> Result<Board> {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start QEMU (scripts/install-deps installs qemu-system-x86, qemu-system-arm, ovmf and u-boot-qemu)")?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let console = SerialConsole::of_child(&mut child, &log)?;
        Ok(Board {
            child,
            stdin,
            console,
            consumed: 0,
            seq: 0,
            started,
            log: log_path,
        })
    }

    /// Time since QEMU started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the console shows `needle` after what was read so far; returns the rest
    /// of that line and moves past it.
    pub fn wait_for(&mut self, needle: &str) -> Result<String> {
        let consumed = self.consumed;
        let (rest, consumed) = self
            .console
            .wait(&format!("{needle:?}"), HANG_GUARD, |text| {
                let start = consumed + text[consumed..].find(needle)? + needle.len();
                let end = text[start..].find('\n')?;
                Some((text[start..start + end].to_string(), start + end + 1))
            })?;
        self.consumed = consumed;
        Ok(rest)
    }

    /// Waits for the board's init to be ready, then makes its console shell a command loop.
    /// Returns the slot init reported (`A` or `B`).
    pub fn shell(&mut self) -> Result<String> {
        let slot_line = self.wait_for("lichen-init: slot ")?;
        self.wait_for("lichen-init: ready")?;
        // The interactive shell echoes this one line; its output (the marker, spelt so that
        // the echo does not contain it) comes after.
        writeln!(
            self.stdin,
            "exec sh -c 'stty -echo; printf \"@@LO%sP@@\\n\" O; while IFS= read -r l; do eval \"$l\"; done'"
        )
        .and_then(|()| self.stdin.flush())
        .context("cannot write to the console")?;
        self.wait_for("@@LOOP@@")?;
        Ok(slot_line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// Sends a line to the console loop without waiting for anything.
    pub fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .context("cannot write to the console")
    }

    /// Runs a shell command; returns its exit status and output.
    pub fn run(&mut self, command: &str) -> Result<(i32, String)> {
        assert!(!command.contains('\n'), "one line per command: {command:?}");
        self.seq += 1;
        let seq = self.seq;
        self.send(&format!(
            "{{ {command} ; }} </dev/null 2>&1; printf '\\n@@{seq}:%d@@\\n' $?"
        ))?;
        let start = self.consumed;
        let status = self.wait_for(&format!("\n@@{seq}:"))?;
        let text = self.console.text();
        let marker = format!("\n@@{seq}:");
        let at = text[start..].find(&marker).map_or(start, |i| start + i);
        let output = text[start..at].to_string();
        let status: i32 = status
            .trim_end_matches("@@")
            .parse()
            .with_context(|| format!("bad status marker after {command:?}: {status:?}"))?;
        Ok((status, output))
    }

    /// Runs a command that must succeed; returns its output trimmed.
    pub fn sh(&mut self, command: &str) -> Result<String> {
        crate::console::sh_ok(|c| self.run(c), command)
    }

    /// Runs `command` every second until `done` holds for its output; returns that output.
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
            HANG_GUARD,
            Duration::from_secs(1),
        )
    }

    /// Cuts the power: SIGKILL to QEMU.
    pub fn power_cut(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Shuts the board down from inside (`poweroff`) and waits for QEMU to exit.
    pub fn poweroff(mut self) -> Result<()> {
        self.send("poweroff")?;
        let deadline = Instant::now() + HANG_GUARD;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the board did not power off");
    }

    /// The last `bytes` of the console, for failure messages.
    pub fn console_tail(&self, bytes: usize) -> String {
        self.console.tail(bytes)
    }

    /// Where the whole console is logged (across boots of one disk).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
