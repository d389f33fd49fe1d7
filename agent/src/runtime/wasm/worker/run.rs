//! The worker task itself: takes events one at a time, commits what each wrote, swaps
//! versions between two events, restarts trapped instances with back-off.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_host_apis::{Command, Event, GpioEdge, KvMap, LogLevel, PendingWrites, Tick};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::super::artifacts::ArtifactKind;
use super::super::command::{
    CommandInput, CommandOutput, CommandProgram, run_command, stream_command,
};
use super::super::instance::{CallOutcome, Instance, InstanceSetup};
use super::{
    BACKOFF_MAX, BACKOFF_START, CommandCommitted, Delivery, EventRequest, Prepared, Queued, Reply,
    WorkerCommand, WorkerContext, WorkerStats, commit, commit_error, open_devices, release_devices,
    restore_devices, setup_for, start_instance,
};
use crate::deployment::{RestartPolicy, Trigger};
use crate::store::{CommandRecord, StatusUpdate, StoreError};
use crate::util::{deadline_after, now_ms};

pub(super) struct Worker {
    pub(super) ctx: WorkerContext,
    pub(super) name: Arc<str>,
    pub(super) current: Prepared,
    /// The previous version, kept until the new one has handled its first event.
    pub(super) fallback: Option<Prepared>,
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
    Stop(oneshot::Sender<()>),
}

impl Worker {
    /// The worker's loop. The rare steps (start, swap, stop, failures, reload bookkeeping)
    /// are awaited boxed: a task's future is as large as its largest await point, and every
    /// idle worker would otherwise carry the largest one (~KiBs per workload).
    pub(super) async fn run(mut self) {
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
                        self.set_state("running", None);
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
                        if let Some(delay) = self.dispatch(request.delivery, request.reply).await {
                            restart_at = Some(deadline_after(delay));
                        }
                        Next::Continue
                    }
                    None => return Box::pin(self.finish()).await,
                },
                _ = tick(&mut ticker), if running => {
                    if let Some(delay) = self.dispatch(Delivery::Tick, None).await {
                        restart_at = Some(deadline_after(delay));
                    }
                    Next::Continue
                }
            };
            if let Next::Stop(done) = next {
                Box::pin(self.finish()).await;
                let _ = done.send(());
                return;
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

    fn publish_version(&self) {
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

    fn setup(&self) -> InstanceSetup {
        setup_for(&self.ctx, &self.current.spec, self.kv.clone())
    }

    /// Creates the instance; returns a restart delay when it failed.
    async fn start(&mut self) -> Option<Duration> {
        self.set_state("starting", None);
        let mut setup = self.setup();
        setup.devices = match open_devices(&self.ctx, &self.current.spec).await {
            Ok(devices) => devices,
            Err(message) => return self.failed("start-failed", message).await,
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
                self.set_state("running", None);
                self.record(
                    "started",
                    format!("version {} running", self.current.version),
                )
                .await;
                None
            }
            Err(message) => self.failed("start-failed", message).await,
        }
    }

    /// Records a failure and decides on a restart per the policy.
    async fn failed(&mut self, kind: &str, message: String) -> Option<Duration> {
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
            self.set_state("failed", Some(message.clone()));
            self.record(kind, format!("{message}; restart policy is never"))
                .await;
            return None;
        }
        let delay = backoff(self.failures_in_a_row);
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        self.ctx.metrics.restarts.fetch_add(1, Ordering::Relaxed);
        self.set_state("backoff", Some(message.clone()));
        self.record(kind, format!("{message}; restarting in {delay:?}"))
            .await;
        Some(delay)
    }

    /// Handles one event; returns a restart delay when the instance was lost.
    async fn dispatch(
        &mut self,
        delivery: Delivery,
        reply: Option<oneshot::Sender<Reply>>,
    ) -> Option<Duration> {
        if self.current.artifact.kind() == ArtifactKind::Command {
            return match delivery {
                Delivery::Tick => Box::pin(self.run_command_once()).await,
                // A WASI command has no device access, so no edge to react to.
                Delivery::GpioEdge { .. } => None,
                Delivery::Command { .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(format!(
                            "workload {:?} is a WASI command: it takes no commands",
                            &*self.name
                        )));
                    }
                    None
                }
            };
        }
        let event = match &delivery {
            Delivery::Tick => {
                self.tick_sequence += 1;
                Event::Tick(Tick {
                    sequence: self.tick_sequence,
                    scheduled_at_ms: now_ms(),
                })
            }
            Delivery::GpioEdge { input, event } => Event::GpioEdge(GpioEdge {
                name: input.clone(),
                edge: match event.edge {
                    lichen_devices::Edge::Rising => lichen_host_apis::Edge::Rising,
                    lichen_devices::Edge::Falling => lichen_host_apis::Edge::Falling,
                },
                timestamp_ns: event.timestamp_ns,
                seqno: event.seqno,
            }),
            Delivery::Command {
                id, name, payload, ..
            } => Event::Command(Command {
                id: id.clone(),
                name: name.clone(),
                payload: payload.clone(),
            }),
        };
        loop {
            let Some(instance) = self.current.instance.take() else {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(format!(
                        "workload {:?} has no running instance",
                        &*self.name
                    )));
                }
                return None;
            };
            let started = Instant::now();
            let (instance, outcome) = instance.handle_off_workers(event.clone()).await;
            self.current.instance = instance;
            match outcome {
                CallOutcome::Ok(_) | CallOutcome::GuestError(_) => {
                    let writes = self
                        .current
                        .instance
                        .as_mut()
                        .map(Instance::take_pending)
                        .unwrap_or_default();
                    let answer = match outcome {
                        CallOutcome::Ok(r) => Ok(r),
                        CallOutcome::GuestError(m) => Err(m),
                        CallOutcome::Trap(_) => unreachable!("handled in the outer match"),
                    };
                    // A hub command's id and result commit with the event's writes.
                    let hub = match &delivery {
                        Delivery::Command {
                            id, hub: Some(hub), ..
                        } => Some((id, hub)),
                        _ => None,
                    };
                    let committed = if writes.is_empty() && hub.is_none() {
                        self.uncounted_events += 1;
                        Ok(())
                    } else {
                        let events = 1 + std::mem::take(&mut self.uncounted_events);
                        let record = hub.map(|(id, hub)| CommandRecord {
                            inbox_id: id.clone(),
                            result: (hub.result)(&answer),
                        });
                        commit(&self.ctx, &self.name, &writes, events, record).await
                    };
                    let applied = committed.is_ok();
                    let result = match committed {
                        Ok(()) => {
                            if let Some((_, hub)) = hub {
                                let _ = hub.done.set(CommandCommitted::Now);
                            }
                            answer
                        }
                        Err(StoreError::CommandHandled(id)) => {
                            if let Some((_, hub)) = hub {
                                let _ = hub.done.set(CommandCommitted::Before);
                            }
                            Err(format!("command {id} was handled already"))
                        }
                        Err(e) => Err(commit_error(&e)),
                    };
                    if let Some(instance) = self.current.instance.as_ref() {
                        // Only what is durable becomes visible to later events.
                        if applied {
                            instance.apply_committed(&writes);
                        }
                        self.stats
                            .memory_bytes
                            .store(instance.memory_bytes() as u64, Ordering::Relaxed);
                    }
                    if let Err(message) = &result {
                        self.ctx.logs.agent_line(
                            &self.name,
                            LogLevel::Warn,
                            &format!("event failed: {message}"),
                        );
                    }
                    self.stats.events_handled.fetch_add(1, Ordering::Relaxed);
                    self.ctx
                        .metrics
                        .events_handled
                        .fetch_add(1, Ordering::Relaxed);
                    self.ctx.metrics.handle.observe(started.elapsed());
                    self.failures_in_a_row = 0;
                    if let Some(old) = self.fallback.take() {
                        self.ctx.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                        let detail = format!(
                            "version {} handled its first event; version {} retired",
                            self.current.version, old.version
                        );
                        Box::pin(release(old)).await;
                        Box::pin(self.record("reload-confirmed", detail)).await;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                    return None;
                }
                CallOutcome::Trap(message) => {
                    if let Some(instance) = self.current.instance.as_mut() {
                        instance.discard_pending();
                    }
                    self.stats.traps.fetch_add(1, Ordering::Relaxed);
                    self.ctx.metrics.traps.fetch_add(1, Ordering::Relaxed);
                    if let Some(old) = self.fallback.take() {
                        // The new version trapped on its first event: go back to the old one
                        // and give it the same event, so it is handled exactly once.
                        let failed_version = self.current.version;
                        let text = format!(
                            "reload to version {failed_version} failed: it trapped on its first event ({message}); version {} keeps running",
                            old.version
                        );
                        let failed = std::mem::replace(&mut self.current, old);
                        Box::pin(release(failed)).await;
                        Box::pin(restore_devices(&self.ctx, &self.current.spec)).await;
                        self.publish_version();
                        self.ctx
                            .metrics
                            .reload_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.ctx.logs.agent_line(&self.name, LogLevel::Error, &text);
                        self.set_state("running", Some(text.clone()));
                        Box::pin(self.record("reload-failed", text)).await;
                        continue;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(format!("the guest trapped: {message}")));
                    }
                    return Box::pin(self.failed("trapped", message)).await;
                }
            }
        }
    }

    /// A streaming run, raced against the worker's control channel: a stop (or the channel
    /// closing) drops the run and is kept in `stop_during_run` for the loop, and `None` is
    /// returned; a reload that comes meanwhile is refused (the running program is not
    /// replaced under containerd).
    async fn stream_command_once(
        &mut self,
        pre: CommandProgram,
        output: &dyn CommandOutput,
        memory_limit: usize,
    ) -> Option<Result<i32, String>> {
        let run = stream_command(
            self.ctx.engine.engine(),
            pre,
            &self.name,
            command_input(&self.current.spec),
            output,
            memory_limit,
        );
        tokio::pin!(run);
        loop {
            tokio::select! {
                outcome = &mut run => return Some(outcome),
                command = self.control.recv() => match command {
                    Some(WorkerCommand::Stop { done }) => {
                        self.stop_during_run = Some(Some(done));
                        return None;
                    }
                    Some(WorkerCommand::Swap { .. }) => {
                        // Dropping `done` fails the reload; the run goes on.
                        self.ctx.logs.agent_line(
                            &self.name,
                            LogLevel::Warn,
                            "a streaming command is not reloaded while it runs",
                        );
                    }
                    None => {
                        self.stop_during_run = Some(None);
                        return None;
                    }
                },
            }
        }
    }

    /// Runs a WASI command once; returns a restart delay when it failed and may be retried.
    /// A command with an output sink registered under the workload's name runs streaming and
    /// unsliced, and a stop ends it mid-run ([`Worker::stream_command_once`]).
    async fn run_command_once(&mut self) -> Option<Duration> {
        let pre = self.current.artifact.command()?.clone();
        self.set_state("running", None);
        self.stats.set(|s| s.started_at = Some(Instant::now()));
        let setup = self.setup();
        let started = Instant::now();
        let outcome = match self.ctx.outputs.get(&self.name) {
            Some(output) => {
                self.stream_command_once(pre, output.as_ref(), setup.memory_limit)
                    .await?
            }
            None => {
                run_command(
                    self.ctx.engine.engine(),
                    pre,
                    &self.name,
                    command_input(&self.current.spec),
                    self.ctx.logs.as_ref(),
                    setup.memory_limit,
                    setup.time_slice,
                )
                .await
            }
        };
        self.ctx.metrics.handle.observe(started.elapsed());
        let has_ticker = !self.current.spec.triggers.is_empty();
        if let Ok(code) = outcome {
            self.stats.set(|s| s.exit_code = Some(code));
        }
        match outcome {
            Ok(0) => {
                self.stats.events_handled.fetch_add(1, Ordering::Relaxed);
                self.ctx
                    .metrics
                    .events_handled
                    .fetch_add(1, Ordering::Relaxed);
                let _ = commit(&self.ctx, &self.name, &PendingWrites::default(), 1, None).await;
                self.failures_in_a_row = 0;
                if !has_ticker {
                    self.set_state("completed", None);
                    self.record("completed", "exit code 0".to_string()).await;
                }
                None
            }
            Ok(code) => {
                let message = format!("command exited with code {code}");
                if has_ticker {
                    self.ctx
                        .logs
                        .agent_line(&self.name, LogLevel::Warn, &message);
                    None
                } else {
                    self.failed("exited", message).await
                }
            }
            Err(message) => {
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                self.ctx.metrics.traps.fetch_add(1, Ordering::Relaxed);
                if has_ticker {
                    self.ctx
                        .logs
                        .agent_line(&self.name, LogLevel::Error, &message);
                    self.set_state("running", Some(message));
                    None
                } else {
                    self.failed("trapped", message).await
                }
            }
        }
    }

    async fn swap(&mut self, next: Prepared) {
        let previous = std::mem::replace(&mut self.current, next);
        let from = previous.version;
        // Keep the old instance until the new one has handled an event; if the old one was
        // not running there is nothing to fall back to.
        let replaced = std::mem::replace(
            &mut self.fallback,
            previous.instance.is_some().then_some(previous),
        );
        if let Some(replaced) = replaced {
            release(replaced).await;
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
            self.set_state("running", None);
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
            release(old).await;
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
        self.set_state("stopped", None);
        self.record_and_wait("stopped", "stopped".to_string()).await;
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

    fn set_state(&self, state: &str, error: Option<String>) {
        self.stats.set(|s| {
            s.state = state.to_string();
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Persists the status with an event-log row. The write goes to the store's queue in the
    /// background: the status of the next event does not wait for this fsync, and the store's
    /// single writer keeps the rows in order.
    async fn record(&mut self, kind: &str, detail: String) {
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

/// Feeds one `gpio-edge` trigger: takes the edges queued on the input and queues the wanted
/// ones as events, then sleeps until the line has more.
struct EdgeWatcher {
    /// The instance's grants (weak: the watcher must not keep the pins open).
    devices: std::sync::Weak<lichen_host_apis::DeviceGrants>,
    /// Where edge events go (weak: the queue closes with the workload's handle).
    queue: mpsc::WeakSender<Queued>,
    input: String,
    wanted: lichen_devices::EdgeDetection,
    logs: Arc<crate::logs::LogHub>,
    name: Arc<str>,
}

impl EdgeWatcher {
    /// The input pin, while the instance holds it.
    fn pin(&self) -> Option<Arc<lichen_host_apis::GrantedInput>> {
        let grants = self.devices.upgrade()?;
        match grants.gpio(&self.input) {
            Some(lichen_host_apis::GpioGrant::Input(pin)) => Some(pin.clone()),
            _ => None,
        }
    }

    fn stopped(&self, error: &lichen_devices::Error) {
        self.logs.agent_line(
            &self.name,
            LogLevel::Error,
            &format!("gpio-edge trigger on \"{}\" stopped: {error}", self.input),
        );
    }

    async fn run(self) {
        let Some(pin) = self.pin() else { return };
        let watch = pin.edge_watch();
        drop(pin);
        let mut watch = match watch {
            Ok(watch) => watch,
            Err(error) => return self.stopped(&error),
        };
        loop {
            // Everything queued so far; then sleep until the line has more.
            loop {
                let Some(pin) = self.pin() else { return };
                let event = match pin.try_edge() {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(error) => return self.stopped(&error),
                };
                drop(pin);
                if !self.wanted.matches(event.edge) {
                    continue;
                }
                let Some(queue) = self.queue.upgrade() else {
                    return;
                };
                let request = Box::new(EventRequest {
                    delivery: Delivery::GpioEdge {
                        input: self.input.clone(),
                        event,
                    },
                    reply: None,
                });
                if queue.send(request).await.is_err() {
                    return;
                }
            }
            if let Err(error) = watch.queued().await {
                // A line released with its instance ends the watcher quietly.
                if self.pin().is_some() {
                    self.stopped(&error);
                }
                return;
            }
        }
    }
}

/// Drops a version, releasing its instance's devices off the async workers.
async fn release(version: Prepared) {
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

/// What a WASI command run is given from its spec: the config, and the arguments and
/// environment of its Wasm artifact (only a Wasm spec reaches the engine; another kind has none).
fn command_input(spec: &crate::deployment::WorkloadSpec) -> CommandInput<'_> {
    static NO_ENV: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let (args, env) = match &spec.artifact {
        crate::deployment::Artifact::Wasm(wasm) => (wasm.args.as_slice(), &wasm.env),
        _ => (&[][..], &NO_ENV),
    };
    CommandInput {
        config: &spec.config,
        args,
        env,
    }
}
