//! The task service driven as containerd drives it: a real ttrpc client on the service's Unix
//! socket, a real ttrpc events server standing in for containerd's, and the stand-in agent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::*;
use containerd_shim_protos::events::task::{TaskExit, TaskStart};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, Events, TaskClient, create_events};
use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, Code, context};
use tokio::io::AsyncReadExt;

use crate::agent::Exit;
use crate::bootstrap::write_context;
use crate::events::EventTarget;
use crate::testing::FakeAgent;
use crate::{TaskServer, TaskService, serve};

const DEADLINE: Duration = Duration::from_secs(30);
const SLOT: u64 = 64 << 20;

/// containerd's events service, recording what it is forwarded.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<Envelope>>>);

#[async_trait]
impl Events for Recorder {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        self.0
            .lock()
            .unwrap()
            .push(req.envelope.unwrap_or_default());
        Ok(Empty::new())
    }
}

struct Harness {
    dir: tempfile::TempDir,
    service: Arc<TaskService<FakeAgent>>,
    server: Option<TaskServer>,
    events_server: Server,
    recorder: Recorder,
    client: TaskClient,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::default();
        let events_socket = dir.path().join("containerd.sock.ttrpc");
        let mut events_server = Server::new()
            .bind(&format!("unix://{}", events_socket.display()))
            .unwrap()
            .register_service(create_events(Arc::new(recorder.clone())));
        events_server.start().await.unwrap();

        let service = Arc::new(TaskService::new(Arc::new(FakeAgent::new(SLOT))));
        let socket = dir.path().join("run/task.sock");
        let server = serve(&socket, service.clone()).await.unwrap();
        let client = TaskClient::new(
            Client::connect(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
        Self {
            dir,
            service,
            server: Some(server),
            events_server,
            recorder,
            client,
        }
    }

    fn agent(&self) -> &FakeAgent {
        self.service.agent()
    }

    /// A bundle for task `id` whose rootfs holds `/app/hello.wasm`, with the given spec.
    fn bundle(&self, id: &str, spec: serde_json::Value) -> PathBuf {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs/app")).unwrap();
        std::fs::write(bundle.join("rootfs/app/hello.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::write(bundle.join("rootfs/app/sh"), b"\x7fELF").unwrap();
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        write_context(
            &bundle,
            &EventTarget {
                ttrpc_address: self
                    .dir
                    .path()
                    .join("containerd.sock.ttrpc")
                    .display()
                    .to_string(),
                namespace: "test-ns".into(),
            },
        )
        .unwrap();
        bundle
    }

    fn fifo(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        path
    }

    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdout: &str,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdout: stdout.into(),
            ..Default::default()
        };
        self.client.create(ctx(), &req).await
    }

    async fn start(&self, id: &str) -> ttrpc::Result<StartResponse> {
        let req = StartRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.start(ctx(), &req).await
    }

    async fn wait(&self, id: &str) -> WaitResponse {
        let req = WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        tokio::time::timeout(DEADLINE, self.client.wait(context::with_timeout(0), &req))
            .await
            .expect("Wait answers before the deadline")
            .unwrap()
    }

    async fn kill(&self, id: &str, signal: u32) -> ttrpc::Result<Empty> {
        let req = KillRequest {
            id: id.into(),
            signal,
            ..Default::default()
        };
        self.client.kill(ctx(), &req).await
    }

    async fn delete(&self, id: &str) -> ttrpc::Result<DeleteResponse> {
        let req = DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.delete(ctx(), &req).await
    }

    async fn state(&self, id: &str) -> ttrpc::Result<StateResponse> {
        let req = StateRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client.state(ctx(), &req).await
    }

    async fn topics(&self) -> Vec<String> {
        self.service.flush_events().await;
        self.recorder
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.topic.clone())
            .collect()
    }

    async fn close(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let _ = self.events_server.shutdown().await;
    }
}

fn ctx() -> context::Context {
    context::with_timeout(crate::events::timeout_nanos(DEADLINE))
}

fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "args": args, "env": ["PATH=/app"], "cwd": "/", "user": {"uid": 0, "gid": 0} },
        "root": { "path": "rootfs" },
        "linux": { "resources": { "memory": { "limit": 16777216 } } }
    })
}

fn code(err: ttrpc::Error) -> (Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not an RPC status: {other:?}"),
    }
}

#[tokio::test]
async fn program_lifecycle_reaches_containerd_in_order() {
    let h = Harness::new().await;
    let bundle = h.bundle("hello", spec(&["hello.wasm", "--exit=3"]));
    let stdout = h.fifo("hello-stdout");
    let mut reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&stdout)
        .unwrap();
    h.create("hello", &bundle, stdout.to_str().unwrap())
        .await
        .unwrap();

    // The agent got the program as the bundle and image describe it.
    let (entry, args, memory) = h
        .agent()
        .inspect("hello", |w| {
            (w.entrypoint.clone(), w.args.clone(), w.memory_limit)
        })
        .expect("the agent holds the workload");
    assert_eq!(entry, Path::new("/app/hello.wasm"), "found through PATH");
    assert_eq!(args, ["hello.wasm", "--exit=3"]);
    assert_eq!(memory, Some(16 << 20));
    assert_eq!(h.state("hello").await.unwrap().status(), Status::CREATED);

    h.start("hello").await.unwrap();
    let waited = h.wait("hello").await;
    assert_eq!(waited.exit_status, 3);
    let state = h.state("hello").await.unwrap();
    assert_eq!((state.status(), state.exit_status), (Status::STOPPED, 3));
    let mut line = vec![0u8; 64];
    let n = tokio::time::timeout(DEADLINE, reader.read(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&line[..n]).contains("ran /app/hello.wasm"));

    let deleted = h.delete("hello").await.unwrap();
    assert_eq!(deleted.exit_status, 3);
    assert!(h.agent().ids().is_empty(), "the agent forgot the workload");
    assert_eq!(code(h.state("hello").await.unwrap_err()).0, Code::NOT_FOUND);

    assert_eq!(
        h.topics().await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let envelopes = h.recorder.0.lock().unwrap().clone();
    assert!(envelopes.iter().all(|e| e.namespace == "test-ns"));
    assert_eq!(envelopes[1].event.type_url, "containerd.events.TaskStart");
    assert_eq!(envelopes[2].event.type_url, "containerd.events.TaskExit");
    let start = TaskStart::parse_from_bytes(&envelopes[1].event.value).unwrap();
    assert_eq!(start.container_id, "hello");
    let exit = TaskExit::parse_from_bytes(&envelopes[2].event.value).unwrap();
    assert_eq!((exit.container_id.as_str(), exit.exit_status), ("hello", 3));
    h.close().await;
}

#[tokio::test]
async fn kill_stops_a_running_program_with_128_plus_signal() {
    let h = Harness::new().await;
    let bundle = h.bundle("long", spec(&["/app/hello.wasm"]));
    h.create("long", &bundle, "").await.unwrap();
    h.start("long").await.unwrap();
    assert_eq!(h.state("long").await.unwrap().status(), Status::RUNNING);
    let (c, msg) = code(h.delete("long").await.unwrap_err());
    assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
    h.kill("long", 15).await.unwrap();
    assert_eq!(h.wait("long").await.exit_status, 143);
    let (c, msg) = code(h.kill("long", 9).await.unwrap_err());
    assert!(
        c == Code::NOT_FOUND && msg.contains("already finished"),
        "{msg}"
    );
    h.delete("long").await.unwrap();
    assert_eq!(
        h.topics().await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    h.close().await;
}

#[tokio::test]
async fn sandbox_runs_nothing_until_killed() {
    let h = Harness::new().await;
    let mut json = spec(&["/pause"]);
    json["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-name": "blink",
    });
    let bundle = h.bundle("pod1", json);
    h.create("pod1", &bundle, "").await.unwrap();
    h.start("pod1").await.unwrap();
    assert!(
        h.agent().ids().is_empty(),
        "a sandbox never reaches the agent"
    );
    assert_eq!(h.state("pod1").await.unwrap().status(), Status::RUNNING);
    h.kill("pod1", 9).await.unwrap();
    assert_eq!(h.wait("pod1").await.exit_status, 137);
    h.delete("pod1").await.unwrap();
    assert_eq!(
        h.topics().await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    h.close().await;
}

#[tokio::test]
async fn a_task_deleted_before_start_publishes_create_then_delete() {
    let h = Harness::new().await;
    let bundle = h.bundle("never", spec(&["/app/hello.wasm"]));
    h.create("never", &bundle, "").await.unwrap();
    let (c, _) = code(h.create("never", &bundle, "").await.unwrap_err());
    assert_eq!(c, Code::ALREADY_EXISTS);
    h.delete("never").await.unwrap();
    assert!(h.agent().ids().is_empty());
    assert_eq!(h.topics().await, ["/tasks/create", "/tasks/delete"]);
    h.close().await;
}

#[tokio::test]
async fn bad_pods_are_refused_naming_the_cause_and_change_nothing() {
    let h = Harness::new().await;
    let mut over_slot = spec(&["/app/hello.wasm"]);
    over_slot["linux"]["resources"]["memory"]["limit"] = serde_json::json!(SLOT * 2);
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("noentry", spec(&[]), "process.args"),
        (
            "missing",
            spec(&["/app/missing.wasm"]),
            "\"/app/missing.wasm\" not found",
        ),
        (
            "notwasm",
            spec(&["/app/sh"]),
            "\"/app/sh\" is not a WebAssembly binary",
        ),
        ("escape", spec(&["/../../../../etc/passwd"]), "not found"),
        ("overslot", over_slot, "linux.resources.memory.limit"),
    ];
    for (id, json, expected) in cases {
        let bundle = h.bundle(id, json);
        let (c, msg) = code(h.create(id, &bundle, "").await.unwrap_err());
        assert_eq!(c, Code::INVALID_ARGUMENT, "{id}: {msg}");
        assert!(msg.contains(expected) && msg.contains(id), "{id}: {msg}");
        assert!(h.service.task_ids().is_empty(), "{id}: no task kept");
        assert!(h.agent().ids().is_empty(), "{id}: the agent holds nothing");
    }
    let (c, msg) = code(h.create("../x", h.dir.path(), "").await.unwrap_err());
    assert!(c == Code::INVALID_ARGUMENT && msg.contains("id"), "{msg}");
    assert!(h.topics().await.is_empty(), "no event for a refused create");

    // The service and other pods are unharmed.
    let bundle = h.bundle("good", spec(&["/app/hello.wasm", "--exit=0"]));
    h.create("good", &bundle, "").await.unwrap();
    h.start("good").await.unwrap();
    assert_eq!(h.wait("good").await.exit_status, 0);
    h.close().await;
}

#[tokio::test]
async fn calls_outside_the_lifecycle_answer_unimplemented() {
    let h = Harness::new().await;
    let err = h
        .client
        .pause(
            ctx(),
            &PauseRequest {
                id: "x".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(err).0, Code::UNIMPLEMENTED);
    let err = h
        .client
        .exec(
            ctx(),
            &ExecProcessRequest {
                id: "x".into(),
                exec_id: "e".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(err).0, Code::UNIMPLEMENTED);
    let bundle = h.bundle("tty", spec(&["/app/hello.wasm"]));
    let req = CreateTaskRequest {
        id: "tty".into(),
        bundle: bundle.display().to_string(),
        terminal: true,
        ..Default::default()
    };
    let (c, msg) = code(h.client.create(ctx(), &req).await.unwrap_err());
    assert!(
        c == Code::INVALID_ARGUMENT && msg.contains("terminal"),
        "{msg}"
    );
    // Connect and Shutdown answer without ending the shared server.
    let connected = h
        .client
        .connect(
            ctx(),
            &ConnectRequest {
                id: "x".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(connected.shim_pid, std::process::id());
    h.client
        .shutdown(
            ctx(),
            &ShutdownRequest {
                id: "x".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.client
        .connect(ctx(), &ConnectRequest::default())
        .await
        .unwrap();
    h.close().await;
}

#[tokio::test]
async fn the_agent_ending_a_program_reports_a_trap_as_134() {
    let h = Harness::new().await;
    let bundle = h.bundle("trap", spec(&["/app/hello.wasm"]));
    h.create("trap", &bundle, "").await.unwrap();
    h.start("trap").await.unwrap();
    h.agent().end("trap", Exit::Trapped("unreachable".into()));
    assert_eq!(h.wait("trap").await.exit_status, 134);
    h.close().await;
}

#[tokio::test]
async fn a_second_server_on_a_live_socket_is_refused() {
    let h = Harness::new().await;
    let socket = h.server.as_ref().unwrap().socket().to_path_buf();
    let other = Arc::new(TaskService::new(Arc::new(FakeAgent::new(SLOT))));
    let err = serve(&socket, other)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("already listens"), "{err}");
    h.close().await;
}
