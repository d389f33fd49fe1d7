use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;
use crate::api::client::{Client, ClientError};
use crate::api::types::{DoctorCheck, WorkloadState};

/// Test double of the agent: canned answers, just enough to exercise routing, decoding and
/// error mapping. The real agent is tested end to end through the binary.
#[derive(Clone)]
struct FakeAgent {
    logs: broadcast::Sender<LogLine>,
    stopped: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    fn new() -> Self {
        Self {
            logs: broadcast::channel(16).0,
            stopped: Arc::default(),
        }
    }
}

fn line(at_ms: u64, message: &str) -> LogLine {
    LogLine {
        at_ms,
        workload: "door".into(),
        level: "info".into(),
        context: "main".into(),
        message: message.into(),
    }
}

fn known(workload: &str) -> Result<(), ApiError> {
    if workload == "door" {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no workload named \"{workload}\""
        )))
    }
}

impl Control for FakeAgent {
    async fn deploy(&self, req: DeployRequest) -> Result<DeployReport, ApiError> {
        if req.text.contains("bad") {
            return Err(ApiError::invalid(format!(
                "{}:1:1: unknown field `bad`",
                req.file_name
            )));
        }
        Ok(DeployReport {
            version: 7,
            started: vec!["door".into()],
            ..Default::default()
        })
    }
    async fn ps(&self) -> Vec<WorkloadStatus> {
        vec![WorkloadStatus {
            name: "door".into(),
            kind: "wasm".into(),
            state: WorkloadState::Running,
            module_digest: "sha256:00".into(),
            deployment_version: 7,
            restarts: 0,
            traps: 0,
            events_handled: 3,
            queue_depth: 0,
            memory_bytes: 65536,
            uptime_ms: Some(1500),
            last_error: None,
            ..Default::default()
        }]
    }
    async fn logs(&self, workload: &str, tail: usize) -> Result<Vec<LogLine>, ApiError> {
        known(workload)?;
        let all = [line(1, "first"), line(2, "second")];
        Ok(all[all.len().saturating_sub(tail)..].to_vec())
    }
    fn follow_logs(&self, workload: &str) -> Result<broadcast::Receiver<LogLine>, ApiError> {
        known(workload)?;
        Ok(self.logs.subscribe())
    }
    async fn kv(&self, workload: &str, key: Option<&str>) -> Result<Vec<KvEntry>, ApiError> {
        known(workload)?;
        Ok(vec![KvEntry {
            bucket: "default".into(),
            key: key.unwrap_or("opened").into(),
            value: "3".into(),
            size: 1,
        }])
    }
    async fn events(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>, ApiError> {
        Ok((after + 1..)
            .take(limit.min(3))
            .map(|id| EventRecord {
                id,
                at_ms: 0,
                workload: Some("door".into()),
                kind: "started".into(),
                detail: String::new(),
            })
            .collect())
    }
    async fn send(&self, workload: &str, req: SendRequest) -> Result<SendReply, ApiError> {
        known(workload)?;
        if req.command == "busy" {
            return Err(ApiError::unavailable("workload \"door\" is backing off"));
        }
        Ok(SendReply {
            id: "cmd-1".into(),
            reply: Some(format!("{}:{}", req.command, req.payload)),
        })
    }
    async fn stop(&self, workload: &str) -> Result<(), ApiError> {
        known(workload)?;
        self.stopped
            .lock()
            .expect("stopped list lock is not poisoned")
            .push(workload.into());
        Ok(())
    }
    async fn doctor(&self) -> DoctorReport {
        DoctorReport {
            version: "test".into(),
            board: "sim".into(),
            checks: vec![DoctorCheck {
                name: "wasm runtime".into(),
                status: "ok".into(),
                detail: "wasmtime".into(),
            }],
        }
    }
    fn metrics_text(&self) -> String {
        "lichen_workloads 1\n".into()
    }
    async fn import(
        &self,
        req: crate::api::types::ImportRequest,
    ) -> Result<crate::api::types::ImportReport, ApiError> {
        // No hub link: the same answer as an agent without a `[hub]` section.
        crate::hub::ImportRoute::default().import_bundle(req).await
    }
}

struct Running {
    agent: FakeAgent,
    socket: PathBuf,
    client: Client,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn shut_down(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server stops within 5 s of shutdown")
            .expect("server task does not panic")
    }
}

async fn start(socket: PathBuf) -> Running {
    let agent = FakeAgent::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let (served, path) = (agent.clone(), socket.clone());
    let task = tokio::spawn(async move {
        serve_unix(served, &path, async move {
            let _ = stopped.await;
        })
        .await
    });
    let client = Client::new(socket.clone());
    for _ in 0..200 {
        if client.doctor().await.is_ok() {
            return Running {
                agent,
                socket,
                client,
                stop,
                task,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server did not come up on {}", socket.display());
}

/// Sends one raw HTTP/1.1 request and returns the status code and body.
async fn raw(socket: &Path, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .await
        .expect("server is listening");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request is written");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .expect("answer is read");
    let status = answer[9..12].parse().expect("status line has a code");
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn socket_is_private_and_verbs_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("sub/lichen.sock")).await;
    let mode = std::fs::metadata(&run.socket)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let ps = run.client.ps().await.expect("ps");
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].name, "door");
    let report = run
        .client
        .deploy(&DeployRequest {
            file_name: "deploy.toml".into(),
            text: "[workloads.door]".into(),
            base_dir: "/tmp".into(),
        })
        .await
        .expect("deploy");
    assert_eq!(
        (report.version, report.started),
        (7, vec!["door".to_string()])
    );
    let reply = run
        .client
        .send("door", "open", "{\"s\":1}")
        .await
        .expect("send");
    assert_eq!(reply.reply.as_deref(), Some("open:{\"s\":1}"));
    assert_eq!(
        run.client.logs("door", 1).await.expect("logs"),
        vec![line(2, "second")]
    );
    assert_eq!(
        run.client.kv("door", Some("k")).await.expect("kv")[0].key,
        "k"
    );
    let events = run.client.events(5, 2).await.expect("events");
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![6, 7]);
    run.client.stop("door").await.expect("stop");
    assert_eq!(
        *run.agent.stopped.lock().expect("lock"),
        vec!["door".to_string()]
    );

    let socket = run.socket.clone();
    run.shut_down().await.expect("server ends cleanly");
    assert!(!socket.exists(), "socket file is removed on shutdown");
}

#[tokio::test]
async fn api_errors_map_to_statuses_and_reach_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("lichen.sock")).await;
    let bad = DeployRequest {
        file_name: "deploy.toml".into(),
        text: "bad = 1".into(),
        base_dir: "/tmp".into(),
    };
    let cases = [
        (
            run.client.deploy(&bad).await.map(|_| ()),
            400,
            "invalid",
            "deploy.toml:1:1",
        ),
        (
            run.client.send("gate", "x", "").await.map(|_| ()),
            404,
            "not-found",
            "gate",
        ),
        (
            run.client.send("door", "busy", "").await.map(|_| ()),
            409,
            "unavailable",
            "backing",
        ),
    ];
    for (result, status, code, text) in cases {
        match result {
            Err(ClientError::Api { status: got, error }) => {
                assert_eq!((got, error.code.as_str()), (status, code));
                assert!(error.error.contains(text), "{}", error.error);
            }
            other => panic!("expected an API error, got {other:?}"),
        }
    }
    run.shut_down().await.expect("server ends cleanly");
}

#[tokio::test]
async fn malformed_body_gets_an_api_error_not_plain_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("lichen.sock")).await;
    let body = "{\"file_name\": \"d.toml\"";
    let request = format!(
        "POST /v1/deploy HTTP/1.1\r\nHost: lichen\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = raw(&run.socket, &request).await;
    assert_eq!(status, 400);
    let error: ApiError = serde_json::from_str(&answer).expect("body is an ApiError");
    assert_eq!(error.code, ErrorCode::Invalid);
    assert!(
        error.error.starts_with("malformed request body"),
        "{}",
        error.error
    );

    let (status, answer) = raw(
        &run.socket,
        "GET /v1/events?after=x HTTP/1.1\r\nHost: lichen\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(answer.contains("malformed query string"), "{answer}");
    run.shut_down().await.expect("server ends cleanly");
}

#[tokio::test]
async fn follow_streams_the_tail_then_new_lines_and_ends_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("lichen.sock")).await;
    let mut lines = run.client.follow_logs("door", 1).await.expect("follow");
    let next = async |lines: &mut mpsc::Receiver<Result<LogLine, ClientError>>| {
        tokio::time::timeout(Duration::from_secs(5), lines.recv())
            .await
            .expect("line in 5 s")
    };
    assert_eq!(
        next(&mut lines).await.expect("tail").expect("parses"),
        line(2, "second")
    );
    // Sent after subscription: a duplicate of the tail is skipped, a new line comes through.
    run.agent.logs.send(line(2, "second")).expect("subscribed");
    run.agent.logs.send(line(3, "third")).expect("subscribed");
    assert_eq!(
        next(&mut lines).await.expect("live").expect("parses"),
        line(3, "third")
    );

    run.shut_down()
        .await
        .expect("shutdown is not held up by the follower");
    assert!(
        next(&mut lines).await.is_none(),
        "stream ends when the daemon stops"
    );
}

#[tokio::test]
async fn follower_that_hangs_up_is_unsubscribed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("lichen.sock")).await;
    let lines = run.client.follow_logs("door", 0).await.expect("follow");
    assert_eq!(run.agent.logs.receiver_count(), 1);
    drop(lines);
    for _ in 0..200 {
        if run.agent.logs.receiver_count() == 0 {
            return run.shut_down().await.expect("server ends cleanly");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server still follows the logs for a client that hung up");
}

#[tokio::test]
async fn follow_of_an_unknown_workload_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = start(dir.path().join("lichen.sock")).await;
    let err = run
        .client
        .follow_logs("gate", 10)
        .await
        .expect_err("gate is unknown");
    assert!(
        matches!(err, ClientError::Api { status: 404, .. }),
        "{err:?}"
    );
    run.shut_down().await.expect("server ends cleanly");
}

#[tokio::test]
async fn stale_socket_is_replaced_and_a_live_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("lichen.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind stale socket"));
    assert!(socket.exists());
    let run = start(socket.clone()).await;
    assert_eq!(
        run.client.ps().await.expect("ps on the new daemon").len(),
        1
    );

    let second = serve_unix(FakeAgent::new(), &socket, async {}).await;
    let message = format!("{:#}", second.expect_err("a live daemon owns the socket"));
    assert!(message.contains("already listening"), "{message}");
    assert!(
        run.client.ps().await.is_ok(),
        "the first daemon is untouched"
    );
    run.shut_down().await.expect("server ends cleanly");
}

#[tokio::test]
async fn no_daemon_gives_a_clear_cannot_reach_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("lichen.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind stale socket"));
    let err = Client::new(socket.clone())
        .ps()
        .await
        .expect_err("nobody listens");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach the lichen daemon at {}: is `lichen run` running? \
                 (connection refused)",
            socket.display()
        )
    );
    let missing = Client::new(dir.path().join("nothing.sock")).ps().await;
    let message = missing.expect_err("no socket").to_string();
    assert!(
        message.starts_with("cannot reach the lichen daemon at"),
        "{message}"
    );
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = probe.local_addr().expect("bound address");
    drop(probe);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_metrics(FakeAgent::new(), addr, async move {
        let _ = stopped.await;
    }));
    let mut answer = String::new();
    for _ in 0..200 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("request is written");
            stream
                .read_to_string(&mut answer)
                .await
                .expect("answer is read");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("content-type: text/plain; version=0.0.4"),
        "{answer}"
    );
    assert!(answer.ends_with("lichen_workloads 1\n"), "{answer}");
    let _ = stop.send(());
    task.await
        .expect("no panic")
        .expect("metrics server ends cleanly");
}
