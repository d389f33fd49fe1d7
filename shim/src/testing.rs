//! A stand-in agent for tests of the task service and of the containerd harness, until the
//! task server is wired to the real agent: it runs no Wasm. It checks what the real agent
//! would refuse before running anything (a memory limit over its slot), "runs" a workload by
//! writing one line to its stdout naming the entrypoint and arguments, and ends it with the
//! code an `--exit=N` argument asks for, or when stopped. Enabled by the `testing` feature.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::agent::{AgentError, Exit, PodAgent, PodWorkload, WorkloadStatus};

struct Fake {
    workload: PodWorkload,
    started: bool,
    exit: watch::Sender<Option<Exit>>,
}

/// The stand-in agent.
pub struct FakeAgent {
    slot_bytes: u64,
    workloads: Mutex<HashMap<String, Fake>>,
}

impl FakeAgent {
    /// An agent whose instance slot holds `slot_bytes` of linear memory.
    pub fn new(slot_bytes: u64) -> Self {
        Self {
            slot_bytes,
            workloads: Mutex::new(HashMap::new()),
        }
    }

    /// Ids of the workloads it holds, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Calls `f` with the workload `id` as created, if held.
    pub fn inspect<R>(&self, id: &str, f: impl FnOnce(&PodWorkload) -> R) -> Option<R> {
        self.lock().get(id).map(|w| f(&w.workload))
    }

    /// Ends workload `id` as if its program ended with `exit`.
    pub fn end(&self, id: &str, exit: Exit) {
        if let Some(w) = self.lock().get(id) {
            w.exit.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some(exit);
                    true
                } else {
                    false
                }
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fake>> {
        self.workloads
            .lock()
            .expect("fake agent lock is never poisoned")
    }
}

#[async_trait]
impl PodAgent for FakeAgent {
    async fn create(&self, workload: PodWorkload) -> Result<(), AgentError> {
        if let Some(limit) = workload.memory_limit.filter(|&l| l > self.slot_bytes) {
            return Err(AgentError::Invalid(format!(
                "linux.resources.memory.limit: {limit} bytes is more than the agent's instance slot of {} bytes",
                self.slot_bytes
            )));
        }
        let mut workloads = self.lock();
        if workloads.contains_key(&workload.id) {
            return Err(AgentError::State(format!(
                "workload {} exists",
                workload.id
            )));
        }
        workloads.insert(
            workload.id.clone(),
            Fake {
                workload,
                started: false,
                exit: watch::Sender::new(None),
            },
        );
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), AgentError> {
        let (stdout, line, code) = {
            let mut workloads = self.lock();
            let w = workloads
                .get_mut(id)
                .ok_or_else(|| AgentError::NotFound(id.to_string()))?;
            if w.started {
                return Err(AgentError::State(format!("workload {id} already started")));
            }
            w.started = true;
            let line = format!(
                "fake agent ran {} with args {:?}\n",
                w.workload.entrypoint.display(),
                &w.workload.args[1..]
            );
            let code = w
                .workload
                .args
                .iter()
                .find_map(|a| a.strip_prefix("--exit=")?.parse::<i32>().ok());
            (w.workload.stdout.clone(), line, code)
        };
        if let Some(stdout) = stdout {
            stdout.write(line.as_bytes()).await;
        }
        if let Some(code) = code {
            self.end(id, Exit::Code(code));
        }
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<Exit, AgentError> {
        let mut rx = self
            .lock()
            .get(id)
            .ok_or_else(|| AgentError::NotFound(id.to_string()))?
            .exit
            .subscribe();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return Ok(exit);
            }
            if rx.changed().await.is_err() {
                return Err(AgentError::NotFound(id.to_string()));
            }
        }
    }

    async fn stop(&self, id: &str) -> Result<(), AgentError> {
        if !self.lock().contains_key(id) {
            return Err(AgentError::NotFound(id.to_string()));
        }
        self.end(id, Exit::Stopped);
        Ok(())
    }

    async fn status(&self, id: &str) -> Result<WorkloadStatus, AgentError> {
        let workloads = self.lock();
        let w = workloads
            .get(id)
            .ok_or_else(|| AgentError::NotFound(id.to_string()))?;
        Ok(match (w.started, w.exit.borrow().clone()) {
            (_, Some(exit)) => WorkloadStatus::Exited(exit),
            (true, None) => WorkloadStatus::Running,
            (false, None) => WorkloadStatus::Created,
        })
    }

    async fn remove(&self, id: &str) -> Result<(), AgentError> {
        let mut workloads = self.lock();
        match workloads.get(id) {
            None => Err(AgentError::NotFound(id.to_string())),
            Some(w) if w.started && w.exit.borrow().is_none() => {
                Err(AgentError::State(format!("workload {id} is running")))
            }
            Some(_) => {
                workloads.remove(id);
                Ok(())
            }
        }
    }
}
