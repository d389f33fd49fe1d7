//! Handling one delivery: an event (or a command) on the current instance, committed with what
//! it wrote; and a WASI command run once.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lichen_host_apis::{Command, Event, GpioEdge, LogLevel, PendingWrites, Tick};
use tokio::sync::oneshot;

use super::run::{Worker, release};
use super::{
    CommandCommitted, Delivery, Failure, Reply, WorkerCommand, commit, commit_error,
    restore_devices,
};
use crate::deployment::WorkloadState;
use crate::runtime::wasm::artifacts::ArtifactKind;
use crate::runtime::wasm::command::{
    CommandInput, CommandOutput, CommandProgram, run_command, stream_command,
};
use crate::runtime::wasm::instance::{CallOutcome, Instance};
use crate::store::{CommandRecord, StoreError};
use crate::util::now_ms;

impl Worker {
    /// Handles one event; returns a restart delay when the instance was lost.
    pub(super) async fn dispatch(
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
                        // Not boxed, though its 1.6 KiB of state sits in every idle worker's
                        // task: boxed, 1000 counters took 2.4 KiB less each but writing
                        // dispatch was 4-6% slower (5 December 2026, three runs each).
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
                        Box::pin(release(*old)).await;
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
                        let failed = std::mem::replace(&mut self.current, *old);
                        Box::pin(release(failed)).await;
                        Box::pin(restore_devices(&self.ctx, &self.current.spec)).await;
                        self.publish_version();
                        self.ctx
                            .metrics
                            .reload_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.ctx.logs.agent_line(&self.name, LogLevel::Error, &text);
                        self.set_state(WorkloadState::Running, Some(text.clone()));
                        Box::pin(self.record("reload-failed", text)).await;
                        continue;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(format!("the guest trapped: {message}")));
                    }
                    return Box::pin(self.failed(Failure::Trapped, message)).await;
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
    pub(super) async fn run_command_once(&mut self) -> Option<Duration> {
        let pre = self.current.artifact.command()?.clone();
        self.set_state(WorkloadState::Running, None);
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
                    self.set_state(WorkloadState::Completed, None);
                    self.record(WorkloadState::Completed.as_str(), "exit code 0".to_string())
                        .await;
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
                    self.failed(Failure::Exited, message).await
                }
            }
            Err(message) => {
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                self.ctx.metrics.traps.fetch_add(1, Ordering::Relaxed);
                if has_ticker {
                    self.ctx
                        .logs
                        .agent_line(&self.name, LogLevel::Error, &message);
                    self.set_state(WorkloadState::Running, Some(message));
                    None
                } else {
                    self.failed(Failure::Trapped, message).await
                }
            }
        }
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
