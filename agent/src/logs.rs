//! Guest logs: a bounded ring of recent lines per workload, live followers, a per-workload
//! rate limit so one noisy guest cannot flood memory or the disk, and batched persistence of
//! what passes the limit (the store keeps the last N lines per workload).
//!
//! [`LogHub::lines`] answers `lichen logs`: the store's lines (from before a restart too)
//! followed by the lines of this process not persisted yet, in the order they were written.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lichen_host_apis::{LogLevel, LogSink};
use tokio::sync::broadcast;

use serde::{Deserialize, Serialize};

use crate::store::{GuestLogLine, StateStore, StoreError};

/// A line a guest logged (or that the agent logged about it); `lichen logs` shows these
/// (the API re-exports it as `api::types::LogLine`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The workload the line belongs to.
    pub workload: String,
    /// `trace`, `debug`, `info`, `warn`, `error` or `critical`.
    pub level: String,
    /// Context string the guest gave (`agent` for lines the agent adds).
    pub context: String,
    /// The message.
    pub message: String,
}

/// Longest time an accepted guest log line waits before it is written to the state store
/// (lines arriving meanwhile share the write).
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Settings of the log hub.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// Lines kept in memory per workload.
    pub ring_lines: usize,
    /// Lines per second a workload may log on average.
    pub lines_per_second: f64,
    /// Lines a workload may log in a burst above the average.
    pub burst: f64,
    /// Guest lines below this level are dropped before anything else (`debug` and `trace`
    /// lines would otherwise cost a log write per event on a busy node).
    pub min_level: LogLevel,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            ring_lines: 500,
            lines_per_second: 50.0,
            burst: 200.0,
            min_level: LogLevel::Info,
        }
    }
}

struct WorkloadLog {
    ring: VecDeque<LogLine>,
    /// Created on the first `follow`: an idle workload costs no channel buffer.
    followers: Option<broadcast::Sender<LogLine>>,
    tokens: f64,
    refilled_at: Instant,
    dropped: u64,
    dropped_total: u64,
    /// Lines pushed by this process, and how many of them the store holds now: the newest
    /// `pushed - persisted` lines of the ring are the ones only memory has.
    pushed: u64,
    persisted: u64,
}

/// Collects every workload's log lines.
pub struct LogHub {
    options: LogOptions,
    workloads: Mutex<HashMap<String, WorkloadLog>>,
    unpersisted: Mutex<Vec<GuestLogLine>>,
    /// Held while lines go to the store and while [`LogHub::lines`] reads, so a reader never
    /// sees a line both in the store and as unpersisted, nor in neither.
    persisting: tokio::sync::Mutex<()>,
    /// Wakes the persister when the first unpersisted line arrives (and when the hub goes):
    /// no timer runs while nobody logs.
    wake: Arc<tokio::sync::Notify>,
}

impl Drop for LogHub {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl LogHub {
    /// A hub with these settings.
    pub fn new(options: LogOptions) -> Self {
        Self {
            options,
            workloads: Mutex::new(HashMap::new()),
            unpersisted: Mutex::new(Vec::new()),
            persisting: tokio::sync::Mutex::new(()),
            wake: Arc::default(),
        }
    }

    fn workloads(&self) -> MutexGuard<'_, HashMap<String, WorkloadLog>> {
        // A panic while holding the lock cannot leave a half-updated ring, so keep going.
        self.workloads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(
        map: &'a mut HashMap<String, WorkloadLog>,
        workload: &str,
        options: &LogOptions,
    ) -> &'a mut WorkloadLog {
        map.entry(workload.to_string())
            .or_insert_with(|| WorkloadLog {
                ring: VecDeque::new(),
                followers: None,
                tokens: options.burst,
                refilled_at: Instant::now(),
                dropped: 0,
                dropped_total: 0,
                pushed: 0,
                persisted: 0,
            })
    }

    /// Records a line the agent writes about a workload (not rate-limited).
    pub fn agent_line(&self, workload: &str, level: LogLevel, message: &str) {
        let mut map = self.workloads();
        let entry = Self::entry(&mut map, workload, &self.options);
        self.push(entry, line(workload, level, "agent", message));
    }

    fn push(&self, entry: &mut WorkloadLog, line: LogLine) {
        if entry.ring.len() == self.options.ring_lines {
            entry.ring.pop_front();
        }
        entry.ring.push_back(line.clone());
        entry.pushed += 1;
        if let Some(followers) = &entry.followers
            && followers.send(line.clone()).is_err()
        {
            // Nobody follows any more: free the channel's buffer.
            entry.followers = None;
        }
        let mut unpersisted = self.unpersisted.lock().unwrap_or_else(|p| p.into_inner());
        if unpersisted.is_empty() {
            self.wake.notify_one();
        }
        unpersisted.push(GuestLogLine {
            workload: line.workload,
            at_ms: line.at_ms,
            level: line.level,
            context: line.context,
            message: line.message,
        });
    }

    /// The last `tail` lines of a workload held in memory, oldest first.
    pub fn recent(&self, workload: &str, tail: usize) -> Vec<LogLine> {
        let map = self.workloads();
        map.get(workload)
            .map(|w| {
                w.ring
                    .iter()
                    .skip(w.ring.len().saturating_sub(tail))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last `tail` lines of a workload, oldest first: those in the store (written before a
    /// restart too), then those of this process that are only in memory so far.
    pub async fn lines(
        &self,
        workload: &str,
        tail: usize,
        store: &StateStore,
    ) -> Result<Vec<LogLine>, StoreError> {
        let _persisting = self.persisting.lock().await;
        let stored = store.reads().recent_logs(workload, tail).await?;
        let mut lines: Vec<LogLine> = stored
            .into_iter()
            .map(|l| LogLine {
                at_ms: l.at_ms,
                workload: l.workload,
                level: l.level,
                context: l.context,
                message: l.message,
            })
            .collect();
        if let Some(w) = self.workloads().get(workload) {
            let only_here = usize::try_from(w.pushed.saturating_sub(w.persisted))
                .unwrap_or(usize::MAX)
                .min(w.ring.len());
            lines.extend(w.ring.iter().skip(w.ring.len() - only_here).cloned());
        }
        let excess = lines.len().saturating_sub(tail);
        lines.drain(..excess);
        Ok(lines)
    }

    /// Writes the lines not yet in the store to it, and counts them as persisted.
    pub async fn persist(&self, store: &StateStore) -> Result<(), StoreError> {
        let _persisting = self.persisting.lock().await;
        let lines = self.take_unpersisted();
        if lines.is_empty() {
            return Ok(());
        }
        let mut counts: HashMap<String, u64> = HashMap::new();
        for line in &lines {
            *counts.entry(line.workload.clone()).or_default() += 1;
        }
        store.append_logs(lines).await?;
        let mut map = self.workloads();
        for (workload, n) in counts {
            if let Some(w) = map.get_mut(&workload) {
                w.persisted += n;
            }
        }
        Ok(())
    }

    /// Subscribes to a workload's new lines.
    pub fn follow(&self, workload: &str) -> broadcast::Receiver<LogLine> {
        let mut map = self.workloads();
        Self::entry(&mut map, workload, &self.options)
            .followers
            .get_or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    /// Lines dropped by the rate limit for a workload, in total.
    pub fn dropped(&self, workload: &str) -> u64 {
        self.workloads()
            .get(workload)
            .map(|w| w.dropped_total)
            .unwrap_or(0)
    }

    /// Forgets a workload that left the deployment.
    pub fn remove(&self, workload: &str) {
        self.workloads().remove(workload);
    }

    /// Takes the lines not yet written to the state store.
    pub fn take_unpersisted(&self) -> Vec<GuestLogLine> {
        std::mem::take(&mut *self.unpersisted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes accepted lines to the state store, in batches at most once a second, until
    /// the hub is dropped. It sleeps until a line arrives.
    pub fn spawn_persister(self: &Arc<Self>, store: StateStore) -> tokio::task::JoinHandle<()> {
        let hub = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                if hub.strong_count() == 0 {
                    return;
                }
                // Lines logged within the next second ride in the same write.
                tokio::time::sleep(PERSIST_EVERY).await;
                let Some(hub) = hub.upgrade() else { return };
                if let Err(err) = hub.persist(&store).await {
                    tracing::warn!("cannot persist guest logs: {err}");
                }
            }
        })
    }
}

impl LogSink for LogHub {
    fn log(&self, workload: &str, level: LogLevel, context: &str, message: &str) {
        if level < self.options.min_level {
            return;
        }
        let mut map = self.workloads();
        let options = self.options;
        let entry = Self::entry(&mut map, workload, &options);
        let now = Instant::now();
        let elapsed = now.duration_since(entry.refilled_at).as_secs_f64();
        entry.refilled_at = now;
        entry.tokens = (entry.tokens + elapsed * options.lines_per_second).min(options.burst);
        if entry.tokens < 1.0 {
            entry.dropped += 1;
            entry.dropped_total += 1;
            return;
        }
        entry.tokens -= 1.0;
        if entry.dropped > 0 {
            let note = format!(
                "rate limit: {} lines dropped (limit {} lines/s, burst {})",
                entry.dropped, options.lines_per_second, options.burst
            );
            entry.dropped = 0;
            self.push(entry, line(workload, LogLevel::Warn, "agent", &note));
        }
        self.push(entry, line(workload, level, context, message));
    }
}

fn line(workload: &str, level: LogLevel, context: &str, message: &str) -> LogLine {
    LogLine {
        at_ms: crate::util::now_ms(),
        workload: workload.to_string(),
        level: level.as_str().to_string(),
        context: context.to_string(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noisy_guest_is_rate_limited_and_told_so() {
        let hub = LogHub::new(LogOptions {
            ring_lines: 1000,
            lines_per_second: 10.0,
            burst: 20.0,
            min_level: LogLevel::Info,
        });
        for i in 0..5000 {
            hub.log("noisy", LogLevel::Info, "loop", &format!("line {i}"));
        }
        hub.log("quiet", LogLevel::Info, "main", "hello");
        let kept = hub.recent("noisy", 10_000).len();
        assert!(kept <= 21, "kept {kept} lines of 5000");
        assert!(hub.dropped("noisy") >= 4979);
        assert_eq!(
            hub.recent("quiet", 10).len(),
            1,
            "other workloads are unaffected"
        );
        assert!(hub.take_unpersisted().len() <= 22);
    }

    #[test]
    fn the_ring_keeps_the_last_lines() {
        let hub = LogHub::new(LogOptions {
            ring_lines: 3,
            lines_per_second: 1e9,
            burst: 1e9,
            min_level: LogLevel::Trace,
        });
        for i in 0..10 {
            hub.log("w", LogLevel::Info, "c", &format!("{i}"));
        }
        let msgs: Vec<String> = hub.recent("w", 10).into_iter().map(|l| l.message).collect();
        assert_eq!(msgs, ["7", "8", "9"]);
    }

    fn messages(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().map(|l| l.message.as_str()).collect()
    }

    fn open_store(dir: &tempfile::TempDir) -> StateStore {
        StateStore::open(
            &dir.path().join("lichen.db"),
            crate::store::StoreOptions::default(),
        )
        .expect("store")
    }

    /// The store keeps lines of deployed workloads only: deploy `w`.
    async fn deploy_w(store: &StateStore) {
        store
            .apply_deployment(crate::store::NewDeployment {
                source_name: "deploy.toml".to_owned(),
                source_text: "w".to_owned(),
                digest: "digest".to_owned(),
                description: None,
                workloads: vec![crate::store::NewWorkload {
                    name: "w".to_owned(),
                    spec_json: "{}".to_owned(),
                    module_digest: "module".to_owned(),
                }],
            })
            .await
            .expect("deployed");
    }

    fn chatty() -> LogOptions {
        LogOptions {
            ring_lines: 100,
            lines_per_second: 1e9,
            burst: 1e9,
            min_level: LogLevel::Trace,
        }
    }

    #[tokio::test]
    async fn lines_from_before_a_restart_come_first_and_none_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open_store(&dir);
            deploy_w(&store).await;
            let before = LogHub::new(chatty());
            for i in 0..3 {
                before.log("w", LogLevel::Info, "c", &format!("old {i}"));
            }
            before.persist(&store).await.expect("persisted");
            before.log("w", LogLevel::Info, "c", "lost in the crash");
        }
        // The restarted agent: a new hub (empty ring) on the same state file.
        let store = open_store(&dir);
        let after = LogHub::new(chatty());
        assert_eq!(
            messages(&after.lines("w", 10, &store).await.expect("lines")),
            ["old 0", "old 1", "old 2"],
            "before the new process logs anything"
        );
        after.log("w", LogLevel::Info, "c", "new 0");
        after.log("w", LogLevel::Info, "c", "new 1");
        let all = ["old 0", "old 1", "old 2", "new 0", "new 1"];
        assert_eq!(
            messages(&after.lines("w", 10, &store).await.expect("lines")),
            all
        );
        after.persist(&store).await.expect("persisted");
        after.log("w", LogLevel::Info, "c", "new 2");
        assert_eq!(
            messages(&after.lines("w", 10, &store).await.expect("lines")),
            ["old 0", "old 1", "old 2", "new 0", "new 1", "new 2"],
            "persisted lines of this process are not shown twice"
        );
        assert_eq!(
            messages(&after.lines("w", 2, &store).await.expect("lines")),
            ["new 1", "new 2"],
            "the tail is the newest lines"
        );
        assert!(
            after
                .lines("other", 10, &store)
                .await
                .expect("lines")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn unpersisted_lines_the_ring_dropped_are_not_shown_nor_invented() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        deploy_w(&store).await;
        let hub = LogHub::new(LogOptions {
            ring_lines: 2,
            ..chatty()
        });
        hub.log("w", LogLevel::Info, "c", "s0");
        hub.log("w", LogLevel::Info, "c", "s1");
        hub.persist(&store).await.expect("persisted");
        for i in 0..4 {
            hub.log("w", LogLevel::Info, "c", &format!("u{i}"));
        }
        // Four lines are waiting for the persister, but the ring holds only the last two.
        assert_eq!(
            messages(&hub.lines("w", 10, &store).await.expect("lines")),
            ["s0", "s1", "u2", "u3"]
        );
        assert_eq!(
            messages(&hub.lines("w", 3, &store).await.expect("lines")),
            ["s1", "u2", "u3"],
            "a tail spans the store and memory"
        );
        hub.persist(&store).await.expect("persisted");
        assert_eq!(
            messages(&hub.lines("w", 10, &store).await.expect("lines")),
            ["s0", "s1", "u0", "u1", "u2", "u3"],
            "once persisted, every line is there, in order, once"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_read_while_batches_commit_are_each_shown_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir);
        deploy_w(&store).await;
        let hub = Arc::new(LogHub::new(LogOptions {
            ring_lines: 1000,
            ..chatty()
        }));
        let writer = tokio::spawn({
            let (hub, store) = (hub.clone(), store.clone());
            async move {
                for i in 0..300 {
                    hub.log("w", LogLevel::Info, "c", &format!("{i}"));
                    if i % 7 == 0 {
                        hub.persist(&store).await.expect("persisted");
                    }
                }
                hub.persist(&store).await.expect("persisted");
            }
        });
        let mut reads = 0;
        loop {
            let done = writer.is_finished();
            let lines = hub.lines("w", 1000, &store).await.expect("lines");
            let seen = messages(&lines);
            let expected: Vec<String> = (0..seen.len()).map(|i| i.to_string()).collect();
            assert_eq!(
                seen, expected,
                "a read while batches commit shows a line twice, out of order or misses one"
            );
            reads += 1;
            if done {
                assert_eq!(seen.len(), 300, "after the last commit every line is there");
                break;
            }
            tokio::task::yield_now().await;
        }
        writer.await.expect("the writer ran");
        assert!(reads > 1);
    }

    #[test]
    fn lines_below_the_level_are_dropped() {
        let hub = LogHub::new(LogOptions::default());
        hub.log("w", LogLevel::Debug, "c", "noise");
        hub.log("w", LogLevel::Warn, "c", "signal");
        let msgs: Vec<String> = hub.recent("w", 10).into_iter().map(|l| l.message).collect();
        assert_eq!(msgs, ["signal"]);
    }
}
