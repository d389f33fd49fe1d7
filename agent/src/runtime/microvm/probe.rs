//! Finds QEMU for this host's architecture and tells whether KVM really works: `/dev/kvm`
//! absent, present but not openable, present but unusable, or usable. Usable is proven by
//! booting a real kernel under KVM until it prints its banner, since a `/dev/kvm` that opens
//! and even runs real-mode code may still hang a stock kernel (KVM-PVM does exactly that).

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::qemu::{Accelerator, Machine};

/// How long the KVM trial boot may take to print the kernel banner. Real KVM prints it in well
/// under a second; TCG needs ~3.5 s here (decompression is slow without hardware help).
pub const KVM_TRIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// What every Linux kernel prints first on its early console.
const BANNER: &str = "Linux version";
/// Where `images/fetch-kernel.sh` caches kernels under the cargo target directory, unless
/// `LICHEN_GUEST_CACHE` says otherwise.
const GUEST_CACHE: &str = "guest";

/// A QEMU system emulator found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// The first line of `--version`, for example `QEMU emulator version 7.2.22`.
    pub version: String,
}

/// What `/dev/kvm` can do here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmState {
    /// There is no `/dev/kvm` (no hardware support, module not loaded, or not passed in).
    Absent,
    /// `/dev/kvm` exists but this process cannot open it read-write.
    NoAccess {
        /// The error from opening it.
        reason: String,
    },
    /// `/dev/kvm` opens, but nothing proved it runs a kernel; Lichen does not use it.
    Untested {
        /// Why no trial boot ran (no QEMU, no kernel to boot).
        reason: String,
    },
    /// A trial boot under KVM failed: QEMU refused or the kernel hung.
    Unusable {
        /// What happened.
        reason: String,
    },
    /// A kernel booted under KVM to its banner.
    Usable {
        /// QEMU start to the kernel's banner.
        banner_after: Duration,
    },
}

impl fmt::Display for KvmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmState::Absent => f.write_str("/dev/kvm is absent"),
            KvmState::NoAccess { reason } => {
                write!(f, "/dev/kvm is present but cannot be opened: {reason}")
            }
            KvmState::Untested { reason } => {
                write!(f, "/dev/kvm is present but untested ({reason})")
            }
            KvmState::Unusable { reason } => {
                write!(f, "/dev/kvm is present but unusable: {reason}")
            }
            KvmState::Usable { banner_after } => write!(
                f,
                "/dev/kvm is usable (a kernel printed its banner under KVM after {} ms)",
                banner_after.as_millis()
            ),
        }
    }
}

/// Why there is no usable QEMU binary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QemuError {
    /// No QEMU machine for this architecture.
    #[error("microVMs are not supported on {0}")]
    Unsupported(&'static str),
    /// The binary (named) is not in `PATH`; the Debian package that has it.
    #[error("{binary} is not installed (Debian: apt-get install {package})")]
    NotInstalled {
        /// The binary looked for.
        binary: &'static str,
        /// The Debian package holding it.
        package: &'static str,
    },
    /// The binary cannot be run.
    #[error("cannot run {}: {source}", .path.display())]
    Run {
        /// The binary.
        path: PathBuf,
        /// The cause (shared: a probe is cloned).
        source: std::sync::Arc<std::io::Error>,
    },
    /// `--version` failed or printed nothing.
    #[error("{} --version failed ({status})", .path.display())]
    Version {
        /// The binary.
        path: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
}

/// Why a trial boot of a kernel did not show its banner.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TrialError {
    /// QEMU cannot be started.
    #[error("cannot run {}: {source}", .qemu.display())]
    Run {
        /// The binary.
        qemu: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No banner in time; `pvm` when the host's KVM is KVM-PVM.
    #[error(
        "a kernel booted under {accel} printed no banner within {seconds} s{}",
        if *.pvm { " (this host's KVM is KVM-PVM, module kvm_pvm, which boots only PVM-enabled guest kernels)" } else { "" }
    )]
    NoBanner {
        /// The accelerator tried.
        accel: Accelerator,
        /// The time allowed.
        seconds: u64,
        /// Whether the host's KVM is KVM-PVM.
        pvm: bool,
    },
    /// QEMU ended, saying why (its last line on stderr).
    #[error("QEMU under {accel} failed: {said}")]
    Failed {
        /// The accelerator tried.
        accel: Accelerator,
        /// QEMU's last line.
        said: String,
    },
    /// QEMU ended silently before the banner.
    #[error("QEMU under {accel} exited before the kernel printed its banner")]
    Exited {
        /// The accelerator tried.
        accel: Accelerator,
    },
}

/// What the host offers for microVMs.
#[derive(Debug, Clone)]
pub struct MicrovmProbe {
    /// The QEMU machine for this architecture; `None` where Lichen has no microVM support.
    pub machine: Option<Machine>,
    /// The QEMU binary, or why there is none.
    pub qemu: Result<QemuBinary, QemuError>,
    /// What KVM can do.
    pub kvm: KvmState,
    /// The kernel the KVM trial booted (or would have), if one was found.
    pub trial_kernel: Option<PathBuf>,
}

impl MicrovmProbe {
    /// The accelerator microVMs get: KVM only when the trial boot proved it, else TCG; `None`
    /// when microVMs cannot run at all (no QEMU, unsupported architecture).
    pub fn accelerator(&self) -> Option<Accelerator> {
        if self.machine.is_none() || self.qemu.is_err() {
            return None;
        }
        Some(match self.kvm {
            KvmState::Usable { .. } => Accelerator::Kvm,
            _ => Accelerator::Tcg,
        })
    }

    /// Why microVMs cannot run, in words; `None` when they can.
    pub fn problem(&self) -> Option<String> {
        match (&self.machine, &self.qemu) {
            (None, _) => Some(format!(
                "microVMs are not supported on {}",
                std::env::consts::ARCH
            )),
            (Some(_), Err(reason)) => Some(reason.to_string()),
            _ => None,
        }
    }

    /// One line for `doctor`: QEMU, KVM, and the accelerator with the reason for it.
    pub fn summary(&self) -> String {
        if let Some(problem) = self.problem() {
            return format!("unavailable: {problem}; {}", self.kvm);
        }
        let (machine, qemu) = match (&self.machine, &self.qemu) {
            (Some(m), Ok(q)) => (m, q),
            _ => unreachable!("problem() is None only with a machine and QEMU"),
        };
        let why = match &self.kvm {
            KvmState::Usable { .. } => "KVM works".to_string(),
            other => format!("TCG, because {other}"),
        };
        format!(
            "{} -M {} ({} at {}); accelerator {}: {why}",
            machine.binary,
            machine.machine,
            qemu.version,
            qemu.path.display(),
            self.accelerator().map_or("none", Accelerator::name),
        )
    }
}

/// Probes once per process and keeps the answer (the agent probes at start; `doctor` reuses it).
/// The first call blocks for the trial boot (up to [`KVM_TRIAL_TIMEOUT`]): call it from a
/// blocking thread (`spawn_blocking`), not from an async worker.
pub fn probe_cached() -> &'static MicrovmProbe {
    static PROBE: OnceLock<MicrovmProbe> = OnceLock::new();
    PROBE.get_or_init(|| probe(None))
}

/// Probes the host now. The KVM trial boots `kernel`, or the first of
/// `$LICHEN_MICROVM_TEST_KERNEL`, `/boot/vmlinuz-$(uname -r)`, `/boot/vmlinuz`, `/boot/Image`
/// and the cache of `images/fetch-kernel.sh`. Blocks for up to [`KVM_TRIAL_TIMEOUT`].
pub fn probe(kernel: Option<&Path>) -> MicrovmProbe {
    let machine = Machine::host();
    let qemu = match machine {
        None => Err(QemuError::Unsupported(std::env::consts::ARCH)),
        Some(m) => find_qemu(&m),
    };
    let trial_kernel = kernel.map(Path::to_path_buf).or_else(find_trial_kernel);
    let kvm = match open_kvm() {
        Err(state) => state,
        Ok(()) => match (&machine, &qemu, &trial_kernel) {
            (None, _, _) => KvmState::Untested {
                reason: "no QEMU machine for this architecture".into(),
            },
            (_, Err(reason), _) => KvmState::Untested {
                reason: reason.to_string(),
            },
            (_, _, None) => KvmState::Untested {
                reason: "no kernel to boot a trial with; set LICHEN_MICROVM_TEST_KERNEL".into(),
            },
            (Some(m), Ok(q), Some(k)) => {
                match trial_boot(&q.path, m, Accelerator::Kvm, k, KVM_TRIAL_TIMEOUT) {
                    Ok(banner_after) => KvmState::Usable { banner_after },
                    Err(reason) => KvmState::Unusable {
                        reason: reason.to_string(),
                    },
                }
            }
        },
    };
    MicrovmProbe {
        machine,
        qemu,
        kvm,
        trial_kernel,
    }
}

fn find_qemu(machine: &Machine) -> Result<QemuBinary, QemuError> {
    let path = find_in_path(machine.binary).ok_or(QemuError::NotInstalled {
        binary: machine.binary,
        package: if machine.arch == "x86_64" {
            "qemu-system-x86"
        } else {
            "qemu-system-arm"
        },
    })?;
    let output = match Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            return Err(QemuError::Run {
                path,
                source: std::sync::Arc::new(e),
            });
        }
    };
    let Some(version) = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .filter(|v| output.status.success() && !v.is_empty())
    else {
        return Err(QemuError::Version {
            path,
            status: output.status,
        });
    };
    Ok(QemuBinary { path, version })
}

/// The absolute path of `name` in `PATH`, if it is there.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn open_kvm() -> Result<(), KvmState> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err(KvmState::Absent);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| KvmState::NoAccess {
            reason: e.to_string(),
        })
}

fn find_trial_kernel() -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("LICHEN_MICROVM_TEST_KERNEL") {
        candidates.push(path.into());
    }
    candidates.push(format!("/boot/vmlinuz-{}", release.trim()).into());
    candidates.push("/boot/vmlinuz".into());
    candidates.push("/boot/Image".into());
    let cache = std::env::var_os("LICHEN_GUEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| crate::util::cargo_target_dir().map(|dir| dir.join(GUEST_CACHE)))
        .map(|dir| dir.join("kernel"));
    if let Some(Ok(entries)) = cache.as_ref().map(std::fs::read_dir) {
        let mut cached: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("vmlinuz"))
            .collect();
        cached.sort();
        candidates.extend(cached.into_iter().rev());
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Boots `kernel` without a root under `accel` and waits for its banner on the early console;
/// QEMU is killed as soon as the banner appears or `timeout` passes.
pub(crate) fn trial_boot(
    qemu: &Path,
    machine: &Machine,
    accel: Accelerator,
    kernel: &Path,
    timeout: Duration,
) -> Result<Duration, TrialError> {
    let mut args = machine.base_args(accel);
    args.extend([
        "-m".into(),
        "128".into(),
        "-kernel".into(),
        kernel.as_os_str().to_owned(),
        "-append".into(),
        format!("{} {}", machine.early_console, machine.cmdline(accel, "")).into(),
    ]);
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TrialError::Run {
            qemu: qemu.to_path_buf(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(BANNER) {
                    let _ = tx.send(started.elapsed());
                    break;
                }
            }
            // Dropping tx tells the waiter the console closed without a banner.
        });
    }
    let outcome = rx.recv_timeout(timeout);
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let said = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.contains("terminating on signal"))
        .map(|l| l.trim().to_string());
    match outcome {
        Ok(elapsed) => Ok(elapsed),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TrialError::NoBanner {
            accel,
            seconds: timeout.as_secs(),
            pvm: accel == Accelerator::Kvm && Path::new("/sys/module/kvm_pvm").exists(),
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(match said {
            Some(said) => TrialError::Failed { accel, said },
            None => TrialError::Exited { accel },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel from `images/fetch-kernel.sh`, fetched on demand.
    pub(crate) fn example_kernel() -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/fetch-kernel.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script:?}: {e}"));
        assert!(
            out.status.success(),
            "{script:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Path::new(&dir).join("vmlinuz")
    }

    #[test]
    fn summary_names_the_accelerator_and_why() {
        let machine = Machine::for_arch("x86_64");
        let probe = MicrovmProbe {
            machine,
            qemu: Ok(QemuBinary {
                path: "/usr/bin/qemu-system-x86_64".into(),
                version: "QEMU emulator version 7.2.22".into(),
            }),
            kvm: KvmState::Unusable {
                reason: "a kernel booted under kvm printed no banner within 5 s".into(),
            },
            trial_kernel: None,
        };
        assert_eq!(probe.accelerator(), Some(Accelerator::Tcg));
        assert_eq!(
            probe.summary(),
            "qemu-system-x86_64 -M microvm (QEMU emulator version 7.2.22 at \
             /usr/bin/qemu-system-x86_64); accelerator tcg: TCG, because /dev/kvm is present \
             but unusable: a kernel booted under kvm printed no banner within 5 s"
        );
        let missing = MicrovmProbe {
            qemu: Err(QemuError::NotInstalled {
                binary: "qemu-system-x86_64",
                package: "qemu-system-x86",
            }),
            kvm: KvmState::Absent,
            ..probe
        };
        assert_eq!(missing.accelerator(), None);
        assert_eq!(
            missing.summary(),
            "unavailable: qemu-system-x86_64 is not installed (Debian: apt-get install \
             qemu-system-x86); /dev/kvm is absent"
        );
    }

    /// The trial boot sees a real kernel's banner when the accelerator works (TCG here), so
    /// the KVM verdict below comes from the same check that can succeed.
    #[test]
    fn trial_boot_sees_the_banner_under_tcg() {
        let machine = Machine::host().expect("tests run on x86_64 or aarch64");
        let qemu = find_qemu(&machine).expect("QEMU is installed by scripts/install-deps");
        let kernel = example_kernel();
        println!("trial boot under TCG (no KVM) of {}", kernel.display());
        let after = trial_boot(
            &qemu.path,
            &machine,
            Accelerator::Tcg,
            &kernel,
            Duration::from_secs(120),
        )
        .expect("the kernel prints its banner under TCG");
        println!("banner after {} ms under TCG", after.as_millis());
    }

    /// What this machine's KVM is, reported honestly: on the development machines `/dev/kvm`
    /// is KVM-PVM, where a stock kernel hangs, so the probe must say present but unusable.
    #[test]
    fn probe_reports_what_kvm_really_does_here() {
        let kernel = example_kernel();
        let probe = probe(Some(&kernel));
        println!("microvm probe: {}", probe.summary());
        assert!(probe.qemu.is_ok(), "{:?}", probe.qemu);
        let dev = Path::new("/dev/kvm").exists();
        match &probe.kvm {
            KvmState::Absent => assert!(!dev),
            KvmState::Usable { .. } => {
                assert!(dev);
                assert_eq!(probe.accelerator(), Some(Accelerator::Kvm));
            }
            KvmState::Unusable { reason } => {
                assert!(dev);
                assert!(reason.contains("kvm"), "{reason}");
                assert_eq!(probe.accelerator(), Some(Accelerator::Tcg));
            }
            other => panic!("with QEMU and a kernel the trial must run: {other}"),
        }
        // This machine's /dev/kvm is KVM-PVM (see REFERENCE.md): state it when it is so.
        if is_kvm_pvm() {
            assert!(
                matches!(probe.kvm, KvmState::Unusable { .. }),
                "KVM-PVM cannot boot a stock kernel, yet the probe says {}",
                probe.kvm
            );
        }
    }

    /// Whether the host's KVM is the PVM flavour (its module shows under /sys/module).
    fn is_kvm_pvm() -> bool {
        Path::new("/sys/module/kvm_pvm").exists()
    }
}
