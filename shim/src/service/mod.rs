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

mod rpc;
mod task;

pub use rpc::Handler;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::protobuf::MessageField;
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
use task::{CreateTimings, Task};

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
        let mut timings = CreateTimings::default();
        let mut clock = std::time::Instant::now();
        let mut lap = |part: &mut std::time::Duration| {
            let now = std::time::Instant::now();
            *part = now - clock;
            clock = now;
        };
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
        lap(&mut timings.bundle);
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
        lap(&mut timings.mount);
        let prepared = self
            .prepare(&id, &namespace, &spec, &req, &mut timings)
            .await;
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
        let _ = task.timings.set(timings);
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
        timings: &mut CreateTimings,
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
        let clock = std::time::Instant::now();
        let entry = tokio::task::spawn_blocking(move || read_entrypoint(&root, &name, &cwd, &env))
            .await
            .map_err(|e| rpc_error(Code::INTERNAL, format!("task {id}: {e}")))?
            .map_err(|e| invalid(e.to_string()))?;
        timings.entrypoint = clock.elapsed();
        let clock = std::time::Instant::now();
        let stdout = OutputSink::open("stdout", &req.stdout).map_err(|e| invalid(e.to_string()))?;
        let stderr = OutputSink::open("stderr", &req.stderr).map_err(|e| invalid(e.to_string()))?;
        timings.fifo = clock.elapsed();
        let clock = std::time::Instant::now();
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
        let created = self.agent.create(workload).await;
        timings.agent = clock.elapsed();
        created.map_err(|e| agent_error(id, e))
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
        // The exit event is queued before waiters (Wait, and so containerd's Delete) learn of
        // the exit: a TaskDelete can then never be queued ahead of its TaskExit.
        let _finishing = task.finishing.lock().await;
        if task.exit().is_some() {
            return;
        }
        let record = task::ExitRecord::now(status);
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
        task.record(record);
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

#[cfg(test)]
mod tests;
