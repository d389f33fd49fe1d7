//! The ttrpc Task service v2 (`containerd.task.v2.Task`) over a [`PodAgent`].
//!
//! One service serves every task of every pod; each task is a record here (bundle, stdio,
//! phase, how it ended) plus, for a program, a workload in the agent. A pod's sandbox
//! ("pause") container never reaches the agent: it is a task that runs nothing and ends when
//! killed. Create, Start, Wait, Kill, Delete, State, Pids, Connect and Shutdown are served; the
//! other calls answer `Unimplemented`, as the shim API asks. Events go out in order through
//! [`Publisher`]: create, start, exit, delete.
//!
//! Exit statuses follow what a process would report: the program's exit code (low 8 bits),
//! 128 + signal when killed, 134 (SIGABRT, what `wasmtime run` reports) when the Wasm trapped,
//! 255 when the agent lost the workload.

mod task;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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

use crate::agent::{AgentError, PodAgent, PodWorkload};
use crate::bootstrap::read_context;
use crate::entrypoint::read_entrypoint;
use crate::events::{Publisher, timestamp};
use crate::io::{IoError, OutputSink};
use crate::mounts::{mount_rootfs, unmount_rootfs};
use crate::spec::{TaskKind, read_bundle};
use task::{Phase, Task};

/// Most tasks one service holds at once.
pub const MAX_TASKS: usize = 1024;
/// Longest task id (containerd's own limit for identifiers).
pub const MAX_ID_LEN: usize = 76;
/// What `Connect` reports as the service's version.
const VERSION: &str = concat!("lichen-shim ", env!("CARGO_PKG_VERSION"));
/// ttrpc metadata key containerd puts the namespace in.
const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";

fn rpc_error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn agent_error(id: &str, err: AgentError) -> ttrpc::Error {
    let code = match &err {
        AgentError::NotFound(_) => Code::NOT_FOUND,
        AgentError::Invalid(_) => Code::INVALID_ARGUMENT,
        AgentError::State(_) => Code::FAILED_PRECONDITION,
        AgentError::Unavailable(_) => Code::UNAVAILABLE,
    };
    rpc_error(code, format!("task {id}: {err}"))
}

fn unimplemented(call: &str) -> ttrpc::Error {
    rpc_error(
        Code::UNIMPLEMENTED,
        format!("{call} is not implemented by the lichen runtime"),
    )
}

/// Checks a task id as containerd does for identifiers.
fn check_id(id: &str) -> Result<(), ttrpc::Error> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(rpc_error(
            Code::INVALID_ARGUMENT,
            format!(
                "id {id:?}: must be 1 to {MAX_ID_LEN} letters, digits, '_', '.' or '-', starting with a letter or digit"
            ),
        ))
    }
}

fn no_exec(exec_id: &str) -> Result<(), ttrpc::Error> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(unimplemented("exec (exec_id is set)"))
    }
}

/// The Task service. Share it in an `Arc` and serve it with [`crate::serve`].
pub struct TaskService<A: PodAgent> {
    agent: Arc<A>,
    publisher: Publisher,
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    creating: Mutex<HashSet<String>>,
    pid: u32,
}

impl<A: PodAgent> TaskService<A> {
    /// A service over `agent`. Must be called inside a tokio runtime (it starts the event
    /// publisher).
    pub fn new(agent: Arc<A>) -> Self {
        Self {
            agent,
            publisher: Publisher::spawn(),
            tasks: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            pid: std::process::id(),
        }
    }

    /// The agent behind the service.
    pub fn agent(&self) -> &Arc<A> {
        &self.agent
    }

    /// Task ids currently held, sorted.
    pub fn task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.table().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Waits until every event queued so far has been forwarded.
    pub async fn flush_events(&self) {
        self.publisher.flush().await;
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.tasks
            .lock()
            .expect("task table lock is never poisoned")
    }

    fn task(&self, id: &str) -> Result<Arc<Task>, ttrpc::Error> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("task {id}: not found")))
    }

    /// Reserves `id` for a create in progress.
    fn reserve(&self, id: &str) -> Result<Reservation<'_, A>, ttrpc::Error> {
        let tasks = self.table();
        let mut creating = self.creating.lock().expect("lock is never poisoned");
        if tasks.contains_key(id) || creating.contains(id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("task {id}: already exists"),
            ));
        }
        if tasks.len() + creating.len() >= MAX_TASKS {
            return Err(rpc_error(
                Code::RESOURCE_EXHAUSTED,
                format!("task {id}: this node already holds {MAX_TASKS} tasks"),
            ));
        }
        creating.insert(id.to_string());
        Ok(Reservation {
            service: self,
            id: id.to_string(),
        })
    }

    async fn create_task(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> Result<Arc<Task>, ttrpc::Error> {
        check_id(&req.id)?;
        let _reservation = self.reserve(&req.id)?;
        let id = req.id.clone();
        let invalid =
            |message: String| rpc_error(Code::INVALID_ARGUMENT, format!("task {id}: {message}"));
        if req.terminal {
            return Err(invalid(IoError::Terminal.to_string()));
        }
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(invalid(format!(
                "bundle {:?} is not an absolute path",
                req.bundle
            )));
        }
        let spec = read_bundle(&bundle).map_err(|e| invalid(e.to_string()))?;
        let target = read_context(&bundle);
        if target.is_none() {
            tracing::warn!(task = %id, "no shim context in the bundle: task events are not forwarded");
        }
        let namespace = target
            .as_ref()
            .map(|t| t.namespace.clone())
            .or_else(|| {
                ctx.metadata
                    .get(NAMESPACE_KEY)
                    .and_then(|v| v.first().cloned())
            })
            .unwrap_or_default();

        // Mount the rootfs containerd prepared, if it sent one; undone on any failure below.
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            let root = bundle.join("rootfs");
            mount_rootfs(&req.rootfs, &root)
                .map_err(|e| rpc_error(Code::INTERNAL, format!("task {id}: {e}")))?;
            Some(root)
        };
        let prepared = self.prepare(&id, &namespace, &spec, &req).await;
        if let Err(e) = prepared {
            if let Some(Err(u)) = mounted.as_deref().map(unmount_rootfs) {
                tracing::warn!(task = %id, error = %u, "cannot unmount after a failed create");
            }
            return Err(e);
        }
        let task = Arc::new(Task::new(
            id.clone(),
            bundle,
            spec.kind,
            [req.stdin.clone(), req.stdout.clone(), req.stderr.clone()],
            target,
            mounted,
        ));
        self.table().insert(id, task.clone());
        Ok(task)
    }

    /// Reads the program and hands it to the agent (nothing for a sandbox).
    async fn prepare(
        &self,
        id: &str,
        namespace: &str,
        spec: &crate::spec::BundleSpec,
        req: &CreateTaskRequest,
    ) -> Result<(), ttrpc::Error> {
        let invalid =
            |message: String| rpc_error(Code::INVALID_ARGUMENT, format!("task {id}: {message}"));
        if spec.kind == TaskKind::Sandbox {
            return Ok(());
        }
        let root = spec.root.clone();
        let name = spec.args[0].clone();
        let cwd = spec.cwd.clone();
        let env = spec.env.clone();
        let entry = tokio::task::spawn_blocking(move || read_entrypoint(&root, &name, &cwd, &env))
            .await
            .map_err(|e| rpc_error(Code::INTERNAL, format!("task {id}: {e}")))?
            .map_err(|e| invalid(e.to_string()))?;
        let stdout = OutputSink::open("stdout", &req.stdout).map_err(|e| invalid(e.to_string()))?;
        let stderr = OutputSink::open("stderr", &req.stderr).map_err(|e| invalid(e.to_string()))?;
        let workload = PodWorkload {
            id: id.to_string(),
            namespace: namespace.to_string(),
            identity: spec.identity.clone(),
            entrypoint: entry.path,
            wasm: entry.bytes,
            args: spec.args.clone(),
            env: spec.env.clone(),
            memory_limit: spec.memory_limit,
            stdout,
            stderr,
        };
        self.agent
            .create(workload)
            .await
            .map_err(|e| agent_error(id, e))
    }

    async fn publish<M: containerd_shim_protos::protobuf::MessageFull>(
        &self,
        task: &Task,
        topic: &str,
        event: &M,
    ) {
        if let Some(target) = &task.target {
            self.publisher.publish(target, topic, event).await;
        }
    }

    fn spawn_waiter(self: &Arc<Self>, task: Arc<Task>) {
        let service = self.clone();
        tokio::spawn(async move {
            let status = match task.kind {
                TaskKind::Sandbox => {
                    task.killed.notified().await;
                    task::signal_status(task.signal())
                }
                TaskKind::Program => match service.agent.wait(&task.id).await {
                    Ok(exit) => task::exit_status(&exit, task.signal()),
                    Err(e) => {
                        tracing::error!(task = %task.id, error = %e, "the agent lost a pod workload");
                        task::LOST_STATUS
                    }
                },
            };
            service.finish(&task, status).await;
        });
    }

    /// Records how `task` ended (once) and publishes its exit.
    async fn finish(&self, task: &Task, status: u32) {
        let Some(record) = task.record_exit(status) else {
            return;
        };
        let event = containerd_shim_protos::events::task::TaskExit {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: self.pid,
            exit_status: record.status,
            exited_at: MessageField::some(timestamp(record.at)),
            ..Default::default()
        };
        self.publish(task, topics::TASK_EXIT_EVENT_TOPIC, &event)
            .await;
    }
}

/// Frees a reserved id when the create ends, whatever its outcome.
struct Reservation<'a, A: PodAgent> {
    service: &'a TaskService<A>,
    id: String,
}

impl<A: PodAgent> Drop for Reservation<'_, A> {
    fn drop(&mut self) {
        if let Ok(mut creating) = self.service.creating.lock() {
            creating.remove(&self.id);
        }
    }
}

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
        if task.kind == TaskKind::Program
            && let Err(e) = self.agent.start(&task.id).await
        {
            task.abort_start();
            return Err(agent_error(&task.id, e));
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

#[cfg(test)]
mod tests;
