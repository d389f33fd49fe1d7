//! Guest logs: a bounded ring of recent lines per workload, live followers, a per-workload
//! rate limit so one noisy guest cannot flood memory or the disk, and batched persistence of
//! what passes the limit (the store keeps the last N lines per workload).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lichen_host_apis::{LogLevel, LogSink};
use tokio::sync::broadcast;

use crate::api::types::LogLine;
use crate::store::{GuestLogLine, StateStore};

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
}

/// Collects every workload's log lines.
pub struct LogHub {
    options: LogOptions,
    workloads: Mutex<HashMap<String, WorkloadLog>>,
    unpersisted: Mutex<Vec<GuestLogLine>>,
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
                let lines = hub.take_unpersisted();
                drop(hub);
                if !lines.is_empty()
                    && let Err(err) = store.append_logs(lines).await
                {
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

    #[test]
    fn lines_below_the_level_are_dropped() {
        let hub = LogHub::new(LogOptions::default());
        hub.log("w", LogLevel::Debug, "c", "noise");
        hub.log("w", LogLevel::Warn, "c", "signal");
        let msgs: Vec<String> = hub.recent("w", 10).into_iter().map(|l| l.message).collect();
        assert_eq!(msgs, ["signal"]);
    }
}
