//! A thread with its own root directory, for targets that unpack hostile archives as root.
//!
//! An image layer that escapes its root is exactly what the OCI target hunts, and the fuzzer
//! runs as root (the agent does): an escape must not reach the machine's files. The sandbox
//! thread unshares its filesystem context (`unshare(CLONE_FS)`: root and working directory
//! become its own, the rest of the process keeps the real ones), `chroot`s into a fresh
//! directory, and drops `CAP_MKNOD`, `CAP_SYS_CHROOT` and `CAP_SYS_ADMIN`, so an escape lands
//! in that directory, no device node can be made, and the root cannot be left. Jobs run on it
//! one at a time; a panic in a job is carried back to the caller.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use rustix::thread::{CapabilitySet, UnshareFlags};

type Job = Box<dyn FnOnce() + Send>;

struct Sandbox {
    jobs: Mutex<mpsc::Sender<Job>>,
    root: PathBuf,
}

static SANDBOX: OnceLock<anyhow::Result<Sandbox>> = OnceLock::new();

fn sandbox() -> &'static Sandbox {
    match SANDBOX.get_or_init(start) {
        Ok(sandbox) => sandbox,
        Err(e) => panic!(
            "cannot set up the sandbox the OCI target unpacks layers in (it needs root, as the agent does): {e:#}"
        ),
    }
}

/// The sandbox's root directory as the rest of the process sees it.
pub fn root() -> &'static Path {
    &sandbox().root
}

/// What a job did: its value, or the panic it raised, or nothing within the deadline.
pub enum Outcome<T> {
    /// The job's value.
    Done(T),
    /// The job did not finish within the deadline; it may still be running.
    TimedOut,
}

/// Runs `job` inside the sandbox (where `/` is [`root`]); re-raises its panic here. Waits at
/// most `deadline`.
pub fn run<T: Send + 'static>(
    deadline: Duration,
    job: impl FnOnce() -> T + Send + 'static,
) -> Outcome<T> {
    let sandbox = sandbox();
    let (tx, rx) = mpsc::channel::<Result<T, Box<dyn Any + Send>>>();
    let wrapped: Job = Box::new(move || {
        // The panic's location is known on this thread only: carry it in the message.
        let result = catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
            Box::new(crate::harness::describe(panic.as_ref())) as Box<dyn Any + Send>
        });
        let _ = tx.send(result);
    });
    sandbox
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(wrapped)
        .expect("the sandbox thread is alive");
    match rx.recv_timeout(deadline) {
        Ok(Ok(value)) => Outcome::Done(value),
        Ok(Err(panic)) => resume_unwind(panic),
        Err(mpsc::RecvTimeoutError::Timeout) => Outcome::TimedOut,
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the sandbox thread died"),
    }
}

fn start() -> anyhow::Result<Sandbox> {
    let base = std::env::temp_dir();
    remove_stale(&base);
    let root = base.join(format!("lichen-fuzz-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, entered) = mpsc::channel();
    let inside = root.clone();
    std::thread::Builder::new()
        .name("fuzz-sandbox".into())
        .spawn(move || {
            let result = enter(&inside);
            let ok = result.is_ok();
            let _ = ready.send(result);
            if ok {
                for job in queue {
                    job();
                }
            }
        })
        .context("spawning the sandbox thread")?;
    entered
        .recv()
        .map_err(|_| anyhow::anyhow!("the sandbox thread ended"))??;
    Ok(Sandbox {
        jobs: Mutex::new(jobs),
        root,
    })
}

fn enter(root: &Path) -> anyhow::Result<()> {
    // SAFETY: only CLONE_FS is unshared: this thread gets its own root, working directory and
    // umask. The file descriptor table stays shared with the process, so no thread can observe
    // a descriptor from another table, which is the contract `unshare_unsafe` asks for.
    #[allow(unsafe_code)]
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }.context("unshare(CLONE_FS)")?;
    std::os::unix::fs::chroot(root).with_context(|| format!("chroot {}", root.display()))?;
    std::env::set_current_dir("/").context("chdir /")?;
    let mut caps = rustix::thread::capabilities(None).context("capget")?;
    let dropped = CapabilitySet::MKNOD | CapabilitySet::SYS_CHROOT | CapabilitySet::SYS_ADMIN;
    caps.effective.remove(dropped);
    caps.permitted.remove(dropped);
    caps.inheritable.remove(dropped);
    rustix::thread::set_capabilities(None, caps).context("capset")?;
    Ok(())
}

/// Removes the roots of fuzzing processes that are gone (libFuzzer's fork mode starts many).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lichen-fuzz-root-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
