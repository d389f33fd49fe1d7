//! The Task service's ttrpc face: each call of `containerd.task.v2.Task` mapped onto the
//! service's tasks and the agent.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, KillRequest, PidsRequest, PidsResponse, ProcessInfo, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskIO, TaskStart};
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task as TtrpcTask;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};

use super::task::{self, Phase};
use super::{TaskService, VERSION, agent_error, no_exec, rpc_error, unimplemented};
use crate::agent::{AgentError, PodAgent};
use crate::events::timestamp;
use crate::mounts::unmount_rootfs;
use crate::spec::TaskKind;

/// The service as ttrpc calls it: a shared handle, because Start spawns a task that outlives
/// the call.
pub struct Handler<A: PodAgent>(pub Arc<TaskService<A>>);

impl<A: PodAgent> std::ops::Deref for Handler<A> {
    type Target = TaskService<A>;
    fn deref(&self) -> &TaskService<A> {
        &self.0
    }
}

#[async_trait]
impl<A: PodAgent> TtrpcTask for Handler<A> {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let task = self.create_task(ctx, req.clone()).await.inspect_err(|e| {
            tracing::warn!(task = %req.id, error = ?e, "create refused");
        })?;
        let event = TaskCreate {
            container_id: task.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: self.pid,
            ..Default::default()
        };
        self.publish(&task, topics::TASK_CREATE_EVENT_TOPIC, &event)
            .await;
        Ok(CreateTaskResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        no_exec(&req.exec_id)?;
        let task = self.task(&req.id)?;
        task.begin_start(&req.id)?;
        let clock = std::time::Instant::now();
        if task.kind == TaskKind::Program
            && let Err(e) = self.agent.start(&task.id).await
        {
            task.abort_start();
            return Err(agent_error(&task.id, e));
        }
        let started = clock.elapsed();
        if let Some(t) = task.timings.get() {
            // One line per task with the task path's parts in microseconds (`lichen bench
            // pods` reads them back from the agent's log).
            tracing::info!(
                task = %task.id,
                bundle_us = t.bundle.as_micros(),
                mount_us = t.mount.as_micros(),
                entrypoint_us = t.entrypoint.as_micros(),
                fifo_us = t.fifo.as_micros(),
                create_us = t.agent.as_micros(),
                start_us = started.as_micros(),
                "pod task path timed"
            );
        }
        task.set_phase(Phase::Running);
        let event = TaskStart {
            container_id: task.id.clone(),
            pid: self.pid,
            ..Default::default()
        };
        // Published before the waiter can publish the exit: the order the shim API requires.
        self.publish(&task, topics::TASK_START_EVENT_TOPIC, &event)
            .await;
        self.0.spawn_waiter(task);
        Ok(StartResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        no_exec(&req.exec_id)?;
        let task = self.task(&req.id)?;
        let record = task.wait_exit().await;
        Ok(WaitResponse {
            exit_status: record.status,
            exited_at: MessageField::some(timestamp(record.at)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        no_exec(&req.exec_id)?;
        let task = self.task(&req.id)?;
        if req.signal == 0 {
            // Signal 0 asks whether the process exists.
            return match task.phase() {
                Phase::Stopped => Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("task {}: process already finished", task.id),
                )),
                _ => Ok(Empty::new()),
            };
        }
        match task.phase() {
            Phase::Stopped => Err(rpc_error(
                Code::NOT_FOUND,
                format!("task {}: process already finished", task.id),
            )),
            Phase::Created | Phase::Starting => {
                // Never ran: it ends here, as a created runc container killed before start.
                task.set_signal(req.signal);
                if task.kind == TaskKind::Program {
                    let _ = self.agent.stop(&task.id).await;
                }
                self.finish(&task, task::signal_status(req.signal)).await;
                Ok(Empty::new())
            }
            Phase::Running => {
                task.set_signal(req.signal);
                match task.kind {
                    TaskKind::Sandbox => task.killed.notify_one(),
                    TaskKind::Program => self
                        .agent
                        .stop(&task.id)
                        .await
                        .map_err(|e| agent_error(&task.id, e))?,
                }
                Ok(Empty::new())
            }
        }
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        no_exec(&req.exec_id)?;
        let task = self.task(&req.id)?;
        let record = match task.phase() {
            Phase::Running | Phase::Starting => {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("task {}: still running; kill it first", task.id),
                ));
            }
            Phase::Created => task::ExitRecord::now(0),
            Phase::Stopped => task.exit().unwrap_or_else(|| task::ExitRecord::now(0)),
        };
        if task.kind == TaskKind::Program {
            match self.agent.remove(&task.id).await {
                Ok(()) | Err(AgentError::NotFound(_)) => {}
                Err(e) => return Err(agent_error(&task.id, e)),
            }
        }
        if let Some(Err(e)) = task.rootfs.as_deref().map(unmount_rootfs) {
            tracing::warn!(task = %task.id, error = %e, "cannot unmount the rootfs");
        }
        self.table().remove(&task.id);
        // A task deleted before it ran still resolves its waiters.
        task.record_exit(record.status);
        let event = TaskDelete {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: self.pid,
            exit_status: record.status,
            exited_at: MessageField::some(timestamp(record.at)),
            ..Default::default()
        };
        self.publish(&task, topics::TASK_DELETE_EVENT_TOPIC, &event)
            .await;
        Ok(DeleteResponse {
            pid: self.pid,
            exit_status: record.status,
            exited_at: MessageField::some(timestamp(record.at)),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        no_exec(&req.exec_id)?;
        let task = self.task(&req.id)?;
        let [stdin, stdout, stderr] = task.stdio.clone();
        let exit = task.exit();
        Ok(StateResponse {
            id: task.id.clone(),
            bundle: task.bundle.display().to_string(),
            pid: self.pid,
            status: task.phase().status().into(),
            stdin,
            stdout,
            stderr,
            terminal: false,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exited_at: exit.map_or(MessageField::none(), |e| {
                MessageField::some(timestamp(e.at))
            }),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let task = self.task(&req.id)?;
        let processes = match task.phase() {
            Phase::Running => vec![ProcessInfo {
                pid: self.pid,
                ..Default::default()
            }],
            _ => Vec::new(),
        };
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        // containerd connects before Create too (the id is then unknown): answer for the server.
        let _ = self.table().get(&req.id);
        Ok(ConnectResponse {
            shim_pid: self.pid,
            task_pid: self.pid,
            version: VERSION.to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // The server belongs to the agent and serves other pods: containerd's Shutdown after a
        // task's delete ends nothing here.
        Ok(Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> ttrpc::Result<Empty> {
        Err(unimplemented("Pause"))
    }
    async fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        Err(unimplemented("Resume"))
    }
    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unimplemented("Checkpoint"))
    }
    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unimplemented("Exec"))
    }
    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unimplemented("ResizePty"))
    }
    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        // No stdin is read, so there is nothing to close.
        Ok(Empty::new())
    }
    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unimplemented("Update"))
    }
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Err(unimplemented("Stats"))
    }
}
