//! The worker task itself: takes events one at a time, commits what each wrote, swaps
//! versions between two events, restarts trapped instances with back-off.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_host_apis::{Event, KvMap, LogLevel};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::super::artifacts::ArtifactKind;
use super::super::instance::{CallOutcome, Instance, InstanceSetup};
use super::edges::EdgeWatcher;
use super::{
    BACKOFF_MAX, BACKOFF_START, Delivery, Failure, Prepared, Queued, WorkerCommand, WorkerContext,
    WorkerStats, commit, commit_error, open_devices, release_devices, setup_for, start_instance,
};
use crate::deployment::{RestartPolicy, Trigger, WorkloadState};
use crate::store::StatusUpdate;
use crate::util::deadline_after;

pub(super) struct Worker {
    pub(super) ctx: WorkerContext,
    pub(super) name: Arc<str>,
    pub(super) current: Prepared,
    /// The previous version, kept until the new one has handled its first event (boxed: it
    /// is there only during a reload, and every idle worker carries this struct).
    pub(super) fallback: Option<Box<Prepared>>,
    pub(super) kv: Arc<Mutex<KvMap>>,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) events: mpsc::Receiver<Queued>,
    /// Where edge watchers queue their events (weak: the queue closes with the handle).
    pub(super) edge_queue: mpsc::WeakSender<Queued>,
    pub(super) control: mpsc::UnboundedReceiver<WorkerCommand>,
    pub(super) tick_sequence: u64,
    pub(super) failures_in_a_row: u32,
    /// Events handled that wrote nothing, not yet added to the stored counter: they ride on
    /// the next commit, so a read-only event costs no SQLite write.
    pub(super) uncounted_events: u64,
    /// A stop that came while a streaming command ran (its `done`, or `None` when the
    /// control channel closed): the run was dropped and the loop ends next.
    pub(super) stop_during_run: Option<Option<oneshot::Sender<()>>>,
}

enum Next {
    Continue,
    /// Handle a delivery (awaited once, after the `select!`, so the task holds one
    /// dispatch's state, not one per branch).
    Dispatch(Delivery, Option<oneshot::Sender<super::Reply>>),
    Stop(oneshot::Sender<()>),
}

impl Worker {
    /// The worker's loop. The rare steps (start, swap, stop, failures, reload bookkeeping)
    /// are awaited boxed: a task's future is as large as its largest await point, and every
    /// idle worker would otherwise carry the largest one. The dispatch of an event, the
    /// common step, is awaited in place (an allocation per event would show in dispatch's
    /// throughput) and at one place: awaited in two `select!` branches it took its state
    /// twice. The worker comes boxed too: an async fn's future holds its arguments twice
    /// (as passed and as locals), so a worker by value took its 656 bytes twice in every
    /// task. The task's future is 2.5 KiB so (and the boxed worker 656 bytes), against 6.6 KiB
    /// before.
    pub(super) async fn run(mut self: Box<Self>) {
        self.publish_version();
        let mut ticker = self.make_ticker();
        let mut restart_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
        let mut command_ran = false;
        loop {
            if let Some(stop) = self.stop_during_run.take() {
                Box::pin(self.finish()).await;
                if let Some(done) = stop {
                    let _ = done.send(());
                }
                return;
            }
            let is_command = self.current.artifact.kind() == ArtifactKind::Command;
            // (Re)start the instance when it is due.
            if let Some(at) = restart_at
                && tokio::time::Instant::now() >= at
            {
                restart_at = None;
                if is_command {
                    if ticker.is_none() && !command_ran {
                        command_ran = true;
                        if let Some(delay) = Box::pin(self.run_command_once()).await {
                            restart_at = Some(deadline_after(delay));
                            command_ran = false;
                        }
                        if self.stop_during_run.is_some() {
                            continue;
                        }
                    } else {
                        self.set_state(WorkloadState::Running, None);
                    }
                } else if let Some(delay) = Box::pin(self.start()).await {
                    restart_at = Some(deadline_after(delay));
                }
            }
            let running = self.current.instance.is_some() || (is_command && restart_at.is_none());
            let sleep_until =
                restart_at.unwrap_or_else(|| deadline_after(Duration::from_secs(3600)));
            let next = tokio::select! {
                biased;
                command = self.control.recv() => match command {
                    Some(WorkerCommand::Swap { next, done }) => {
                        Box::pin(self.swap(*next)).await;
                        ticker = self.make_ticker();
                        if self.current.instance.is_none() && self.current.artifact.kind() == ArtifactKind::Component {
                            restart_at = Some(tokio::time::Instant::now());
                        }
                        command_ran = false;
                        if self.current.artifact.kind() == ArtifactKind::Command && ticker.is_none() {
                            restart_at = Some(tokio::time::Instant::now());
                        }
                        let _ = done.send(());
                        Next::Continue
                    }
                    Some(WorkerCommand::Stop { done }) => Next::Stop(done),
                    None => return Box::pin(self.finish()).await,
                },
                _ = tokio::time::sleep_until(sleep_until), if restart_at.is_some() => Next::Continue,
                request = self.events.recv(), if running => match request {
                    Some(request) => {
                        let super::EventRequest { delivery, reply } = *request;
                        Next::Dispatch(delivery, reply)
                    }
                    None => return Box::pin(self.finish()).await,
                },
                _ = tick(&mut ticker), if running => Next::Dispatch(Delivery::Tick, None),
            };
            match next {
                Next::Continue => {}
                Next::Dispatch(delivery, reply) => {
                    if let Some(delay) = self.dispatch(delivery, reply).await {
                        restart_at = Some(deadline_after(delay));
                    }
                }
                Next::Stop(done) => {
                    Box::pin(self.finish()).await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn make_ticker(&self) -> Option<tokio::time::Interval> {
        let period = self.current.spec.triggers.iter().find_map(|t| match t {
            Trigger::Interval(period) => Some(*period),
            Trigger::GpioEdge(_) => None,
        })?;
        // Checked at validation; clamped again since tokio panics on a zero period and the
        // interval adds the period to an instant at every tick.
        let period = period.clamp(Trigger::MIN_INTERVAL, Trigger::MAX_INTERVAL);
        let mut interval = tokio::time::interval_at(deadline_after(period), period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(interval)
    }

    pub(super) fn publish_version(&self) {
        let digest = self.current.artifact.digest().to_string();
        let kind = self.current.artifact.kind().as_str().to_string();
        let version = self.current.version;
        self.stats.set(|s| {
            s.digest = digest;
            s.kind = kind;
            s.version = version;
        });
    }

    /// Starts one watcher per `gpio-edge` trigger of the current spec, feeding the event queue
    /// with the edges of `instance`'s input. A watcher sleeps until the kernel (or the
    /// simulated chip) has an edge queued: nothing wakes up on a timer. It is kept by the
    /// instance and stopped with it; it also ends when the queue closed.
    fn watch_edges(&self, instance: &mut Instance) {
        let devices = Arc::downgrade(&instance.devices());
        for trigger in &self.current.spec.triggers {
            let Trigger::GpioEdge(trigger) = trigger else {
                continue;
            };
            let watcher = EdgeWatcher {
                devices: devices.clone(),
                queue: self.edge_queue.clone(),
                input: trigger.input.clone(),
                wanted: trigger.edge,
                logs: self.ctx.logs.clone(),
                name: self.name.clone(),
            };
            instance.keep_edge_watcher(tokio::spawn(watcher.run()));
        }
    }

    pub(super) fn setup(&self) -> InstanceSetup {
        setup_for(&self.ctx, &self.current.spec, self.kv.clone())
    }

    /// Creates the instance; returns a restart delay when it failed.
    async fn start(&mut self) -> Option<Duration> {
        self.set_state(WorkloadState::Starting, None);
        let mut setup = self.setup();
        setup.devices = match open_devices(&self.ctx, &self.current.spec).await {
            Ok(devices) => devices,
            Err(message) => return self.failed(Failure::StartFailed, message).await,
        };
        let started = start_instance(&self.ctx, &self.current.artifact, &setup).await;
        release_devices(std::mem::take(&mut setup.devices)).await;
        match started {
            Ok(instance) => {
                self.stats
                    .memory_bytes
                    .store(instance.memory_bytes() as u64, Ordering::Relaxed);
                self.stats.set(|s| s.started_at = Some(Instant::now()));
                let mut instance = instance;
                self.watch_edges(&mut instance);
                self.current.instance = Some(instance);
                self.set_state(WorkloadState::Running, None);
                self.record(
                    "started",
                    format!("version {} running", self.current.version),
                )
                .await;
                None
            }
            Err(message) => self.failed(Failure::StartFailed, message.to_string()).await,
        }
    }

    /// Records a failure and decides on a restart per the policy.
    pub(super) async fn failed(&mut self, why: Failure, message: String) -> Option<Duration> {
        let kind = why.as_str();
        self.ctx
            .logs
            .agent_line(&self.name, LogLevel::Error, &message);
        if let Some(instance) = self.current.instance.take() {
            instance.release().await;
        }
        self.stats.set(|s| s.started_at = None);
        self.stats.memory_bytes.store(0, Ordering::Relaxed);
        let restart = self.current.spec.restart != RestartPolicy::Never;
        if !restart {
            self.set_state(WorkloadState::Failed, Some(message.clone()));
            self.record(kind, format!("{message}; restart policy is never"))
                .await;
            return None;
        }
        let delay = backoff(self.failures_in_a_row);
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        self.ctx.metrics.restarts.fetch_add(1, Ordering::Relaxed);
        self.set_state(WorkloadState::Backoff, Some(message.clone()));
        self.record(kind, format!("{message}; restarting in {delay:?}"))
            .await;
        Some(delay)
    }

    async fn swap(&mut self, next: Prepared) {
        let previous = std::mem::replace(&mut self.current, next);
        let from = previous.version;
        // Keep the old instance until the new one has handled an event; if the old one was
        // not running there is nothing to fall back to.
        let replaced = std::mem::replace(
            &mut self.fallback,
            previous.instance.is_some().then(|| Box::new(previous)),
        );
        if let Some(replaced) = replaced {
            release(*replaced).await;
        }
        let mut current = self.current.instance.take();
        let devices = current.as_mut().map(|instance| {
            self.watch_edges(instance);
            self.stats
                .memory_bytes
                .store(instance.memory_bytes() as u64, Ordering::Relaxed);
            instance.devices()
        });
        self.current.instance = current;
        if let Some(devices) = devices {
            // Outputs go to their safe state at the switch; the new version drives them from
            // its first event. Driving them is an ioctl: off the async workers.
            let failures = if devices.is_empty() {
                Vec::new()
            } else {
                tokio::task::spawn_blocking(move || devices.set_safe_state())
                    .await
                    .unwrap_or_default()
            };
            for (pin, error) in failures {
                self.ctx.logs.agent_line(
                    &self.name,
                    LogLevel::Warn,
                    &format!("cannot put pin {pin} in its safe state: {error}"),
                );
            }
            self.stats.set(|s| s.started_at = Some(Instant::now()));
            self.set_state(WorkloadState::Running, None);
        }
        self.failures_in_a_row = 0;
        self.publish_version();
        let detail = format!(
            "switched from version {from} to version {}",
            self.current.version
        );
        self.ctx
            .logs
            .agent_line(&self.name, LogLevel::Info, &detail);
        let ctx = self.ctx.clone();
        let name = self.name.to_string();
        tokio::spawn(async move {
            let _ = ctx.store.log_event(Some(&name), "reloaded", &detail).await;
        });
    }

    async fn finish(&mut self) {
        if let Some(old) = self.fallback.take() {
            release(*old).await;
        }
        if let Some(instance) = self.current.instance.take() {
            let (instance, outcome) = instance.handle_off_workers(Event::Stop).await;
            let Some(mut instance) = instance else {
                self.ctx.logs.agent_line(
                    &self.name,
                    LogLevel::Warn,
                    &format!("lost on stop: {outcome:?}"),
                );
                return self.finish_status().await;
            };
            match outcome {
                CallOutcome::Trap(message) => {
                    instance.discard_pending();
                    self.ctx.logs.agent_line(
                        &self.name,
                        LogLevel::Warn,
                        &format!("trapped on stop: {message}"),
                    );
                }
                _ => {
                    let writes = instance.take_pending();
                    let events = std::mem::take(&mut self.uncounted_events);
                    if let Err(e) = commit(&self.ctx, &self.name, &writes, events, None).await {
                        self.ctx
                            .logs
                            .agent_line(&self.name, LogLevel::Error, &commit_error(&e));
                    }
                }
            }
            instance.release().await;
        }
        self.finish_status().await;
    }

    /// The status of a stopped worker, persisted.
    async fn finish_status(&mut self) {
        self.stats.memory_bytes.store(0, Ordering::Relaxed);
        self.stats.set(|s| s.started_at = None);
        self.set_state(WorkloadState::Stopped, None);
        let stopped = WorkloadState::Stopped.as_str();
        self.record_and_wait(stopped, stopped.to_string()).await;
    }

    fn status_update(&self, kind: &str, detail: String) -> StatusUpdate {
        let status = self.stats.status();
        StatusUpdate {
            workload: self.name.to_string(),
            state: status.state,
            last_error: status.last_error,
            restarts: self.stats.restarts.load(Ordering::Relaxed),
            traps: self.stats.traps.load(Ordering::Relaxed),
            event: Some((kind.to_string(), detail)),
        }
    }

    /// Persists the final status and waits for it (the agent may be shutting down).
    async fn record_and_wait(&mut self, kind: &str, detail: String) {
        let update = self.status_update(kind, detail);
        if let Err(err) = self.ctx.store.record_status(update).await {
            tracing::warn!(workload = %self.name, "cannot record status: {err}");
        }
    }

    pub(super) fn set_state(&self, state: WorkloadState, error: Option<String>) {
        self.stats.set(|s| {
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Persists the status with an event-log row. The write goes to the store's queue in the
    /// background: the status of the next event does not wait for this fsync, and the store's
    /// single writer keeps the rows in order.
    pub(super) async fn record(&mut self, kind: &str, detail: String) {
        let update = self.status_update(kind, detail);
        let store = self.ctx.store.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(err) = store.record_status(update).await {
                tracing::warn!(workload = %name, "cannot record status: {err}");
            }
        });
    }
}

/// Drops a version, releasing its instance's devices off the async workers.
pub(super) async fn release(version: Prepared) {
    if let Some(instance) = version.instance {
        instance.release().await;
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn backoff(failures_in_a_row: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1u32 << failures_in_a_row.min(16))
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(30), Duration::from_secs(30));
    }
}
