//! Small helpers shared by the agent's modules.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

pub use lichen_sync::{millis, now_ms};

/// Whole nanoseconds of a duration, saturating at `u64::MAX` (584 years).
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `after` from now, or a far instant (30 years on) when adding would overflow:
/// a deadline never panics, however long the wait it is given.
pub fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`deadline_after`] waits for at most: 30 years.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// Bytes as a short human figure (`12.3 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Hands the allocator's free memory back to the kernel. glibc keeps what a thread freed in
/// that thread's arena (a compile frees megabytes on a blocking thread, which an idle agent
/// would carry as RSS); musl returns large blocks by itself. Costs a walk of the free lists:
/// for after rare, large work, not per event.
#[allow(unsafe_code)]
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages of the allocator's own.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in bytes, from `/proc/self/status` (Linux only).
pub fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Cargo's target directory for a binary built from this repository: `$CARGO_TARGET_DIR`
/// if set, else the nearest directory above the running binary that cargo marked as its
/// target directory (`CACHEDIR.TAG`, as `target/debug/lichen` has). `None` for an installed
/// binary. Development helpers only (the bench's size figures, the guest kernel cache).
pub fn cargo_target_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return Some(dir.into());
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(std::path::Path::to_path_buf)
}

/// Whether log output on stderr may carry ANSI colour codes: only when stderr is a terminal,
/// and not when `NO_COLOR` is set to anything (<https://no-color.org>). A log file, a pipe or
/// the journal gets plain text.
pub fn stderr_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An error and its causes, `what: why: ...`, as anyhow's `{:#}` prints them, except that a
/// cause whose text the line already ends with is not printed again: Lichen's typed errors
/// (`thiserror`) carry their cause as their `source` and also show it in their own message,
/// so that their `to_string()` is complete on its own.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}

/// Escapes what could hide or disguise text; lives with the deployment errors that use it
/// first ([`lichen_deployment::escape_unprintable`]).
pub use lichen_deployment::escape_unprintable;

/// Writes `bytes` to `path` (mode 0600) so that a crash leaves either the old file or the new
/// one: a temporary file `.<name>.<pid>.<n>.tmp` beside it, synced, renamed over it, and the
/// directory synced. The artifact store removes such temporaries left by an earlier process.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
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
        .unwrap_or("file");
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

/// Runs `work`, which may block (a file read, a mapped file's page faults), where it cannot
/// hold up other tasks, and returns what it returns. On the multi-thread runtime it runs at
/// once on this thread (`block_in_place`: the thread hands its scheduler core to another
/// first), which spares the wait for a blocking-pool thread to wake up, 30-70 us here; on a
/// current-thread runtime it goes to the blocking pool. Either way, the caller's task does
/// nothing else meanwhile.
pub async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return Ok(tokio::task::block_in_place(work));
    }
    tokio::task::spawn_blocking(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_work_runs_in_place_on_the_multi_thread_runtime() {
        let caller = std::thread::current().id();
        let ran_on = run_blocking(|| std::thread::current().id()).await.unwrap();
        assert_eq!(ran_on, caller, "no hand-off to another thread");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_goes_to_the_pool_on_a_current_thread_runtime() {
        let caller = std::thread::current().id();
        let ran_on = run_blocking(|| std::thread::current().id()).await.unwrap();
        assert_ne!(ran_on, caller, "the only scheduler thread is not blocked");
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read {path}: {source}")]
        struct Shown {
            path: &'static str,
            source: std::io::Error,
        }
        #[derive(Debug, thiserror::Error)]
        #[error("cannot start")]
        struct Hidden(#[source] Shown);
        let io = || std::io::Error::other("gone");
        let shown = Shown {
            path: "a",
            source: io(),
        };
        assert_eq!(error_chain(&shown), "cannot read a: gone");
        assert_eq!(
            format!(
                "{:#}",
                anyhow::Error::new(Shown {
                    path: "a",
                    source: io()
                })
            ),
            "cannot read a: gone: gone"
        );
        let hidden = anyhow::Error::new(Hidden(Shown {
            path: "a",
            source: io(),
        }))
        .context("update");
        assert_eq!(
            error_chain(hidden.as_ref()),
            "update: cannot start: cannot read a: gone"
        );
    }

    #[test]
    fn deadlines_never_overflow() {
        let far = deadline_after(Duration::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(365 * 86_400));
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(nanos(Duration::from_secs(1)), 1_000_000_000);
    }
}
