//! The pod runtime on a real agent: WASI command pods run as workloads of the supervisor's
//! `pods` source, stream, end, stop and are refused as containerd's task service sees them.

use std::path::PathBuf;
use std::time::Duration;

use lichen_shim::spec::PodIdentity;
use lichen_shim::{AgentError, Exit, PodAgent, PodWorkload, WorkloadStatus as PodStatus};

use super::PodRuntime;
use crate::api::control::Control;
use crate::api::types::{WorkloadState, WorkloadStatus};
use crate::runtime::wasm::EngineOptions;
use crate::supervisor::{Agent, AgentOptions};

const SLOT: u64 = 16 << 20;

/// Prints `hello from a pod` and exits with 7.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a pod\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 7))))"#;

/// Prints `sleeping`, then sleeps a second at a time for ever.
pub const SLEEPER: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "sleeping\n")
  (func (export "_start")
    (i32.store (i32.const 100) (i32.const 200))
    (i32.store (i32.const 104) (i32.const 9))
    (drop (call $fd_write (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 108)))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 1000000000))
    (loop $forever
      (drop (call $poll (i32.const 0) (i32.const 304) (i32.const 1) (i32.const 400)))
      (br $forever))))"#;

async fn runtime(dir: &std::path::Path) -> (Agent, PodRuntime) {
    let agent = Agent::open(AgentOptions {
        state_dir: dir.to_path_buf(),
        engine: EngineOptions {
            max_instances: 8,
            max_memory_bytes: SLOT,
            ..EngineOptions::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens");
    let pods = PodRuntime::new(agent.clone());
    (agent, pods)
}

/// `ps` rows of the `pods` source.
async fn pod_rows(agent: &Agent) -> Vec<WorkloadStatus> {
    Control::ps(agent)
        .await
        .into_iter()
        .filter(|r| r.source == "pods")
        .collect()
}

/// The messages of `name`'s log lines.
fn log_messages(agent: &Agent, name: &str) -> Vec<String> {
    agent
        .log_hub()
        .recent(name, 50)
        .into_iter()
        .map(|l| l.message)
        .collect()
}

fn workload(id: &str, wasm: Vec<u8>) -> PodWorkload {
    PodWorkload {
        id: id.into(),
        namespace: "k8s.io".into(),
        identity: PodIdentity {
            sandbox_id: Some("sb".into()),
            pod_name: Some("blink".into()),
            pod_namespace: Some("default".into()),
            container_name: Some(id.into()),
        },
        entrypoint: PathBuf::from("/app.wasm"),
        wasm,
        args: vec!["/app.wasm".into()],
        env: vec![("GREETING".into(), "hi".into())],
        memory_limit: None,
        stdout: None,
        stderr: None,
    }
}

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT")
}

async fn wait(pods: &PodRuntime, id: &str) -> Exit {
    tokio::time::timeout(Duration::from_secs(60), pods.wait(id))
        .await
        .expect("the pod ends")
        .expect("known pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_its_output_reaches_its_log_and_its_exit_code_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, pods) = runtime(dir.path()).await;
    pods.create(workload("hello", wat(HELLO))).await.unwrap();
    assert_eq!(pods.status("hello").await.unwrap(), PodStatus::Created);
    pods.start("hello").await.unwrap();
    assert_eq!(wait(&pods, "hello").await, Exit::Code(7));
    let rows = pod_rows(&agent).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0].name, "blink-hello",
        "ps names it by pod and container"
    );
    assert_eq!(rows[0].kind, "wasi-command");
    assert_eq!(rows[0].state, WorkloadState::Failed);
    assert_eq!(rows[0].exit_code, Some(7));
    let labels = &rows[0].labels;
    assert_eq!(labels["namespace"], "default");
    assert_eq!(labels["pod"], "blink");
    assert_eq!(labels["container"], "hello");
    assert_eq!(labels["containerd-namespace"], "k8s.io");
    let lines = log_messages(&agent, "blink-hello");
    assert!(lines.iter().any(|l| l == "hello from a pod"), "{lines:?}");
    pods.remove("hello").await.unwrap();
    assert!(pods.is_empty());
    assert!(pod_rows(&agent).await.is_empty(), "the workload is gone");
    // Its program stays compiled for the next pod of the image (the removal collected
    // unused artifacts).
    let digest = crate::runtime::wasm::sha256_hex(&wat(HELLO));
    assert!(
        agent.artifacts().contains(&digest),
        "the program was collected"
    );
    assert!(matches!(
        pods.status("hello").await,
        Err(AgentError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_streams_before_it_ends_is_stopped_and_cannot_be_removed_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, pods) = runtime(dir.path()).await;
    pods.create(workload("sleeper", wat(SLEEPER)))
        .await
        .unwrap();
    pods.start("sleeper").await.unwrap();
    // Its first line is in the log while it still runs: output is streamed, not collected.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !log_messages(&agent, "blink-sleeper")
        .iter()
        .any(|l| l == "sleeping")
    {
        assert!(std::time::Instant::now() < deadline, "no streamed output");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pods.status("sleeper").await.unwrap(), PodStatus::Running);
    assert!(matches!(
        pods.remove("sleeper").await,
        Err(AgentError::State(_))
    ));
    assert!(matches!(
        pods.start("sleeper").await,
        Err(AgentError::State(_))
    ));
    let row = &pod_rows(&agent).await[0];
    assert_eq!(row.state, WorkloadState::Running, "{row:?}");
    pods.stop("sleeper").await.unwrap();
    assert_eq!(wait(&pods, "sleeper").await, Exit::Stopped);
    assert_eq!(pod_rows(&agent).await[0].state, WorkloadState::Stopped);
    pods.stop("sleeper")
        .await
        .expect("stopping an ended pod is fine");
    pods.remove("sleeper").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_reported_as_trapped() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, pods) = runtime(dir.path()).await;
    let trap = wat(r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#);
    pods.create(workload("trap", trap)).await.unwrap();
    pods.start("trap").await.unwrap();
    assert!(matches!(wait(&pods, "trap").await, Exit::Trapped(_)));
    assert_eq!(pod_rows(&agent).await[0].traps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_programs_and_limits_are_refused_naming_the_field_and_nothing_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, pods) = runtime(dir.path()).await;
    let mut over = workload("big", wat(HELLO));
    over.memory_limit = Some(SLOT + 1);
    let cases = [
        (over, "linux.resources.memory.limit"),
        (
            workload("corrupt", b"\0asm\x01\0\0\0\x01\xff\xff".to_vec()),
            "entrypoint \"/app.wasm\"",
        ),
        (
            workload(
                "import",
                wat(r#"(module (import "nowhere" "thing" (func)) (func (export "_start")))"#),
            ),
            "nowhere",
        ),
    ];
    for (workload, expected) in cases {
        let id = workload.id.clone();
        let err = pods.create(workload).await.expect_err("refused");
        assert!(matches!(err, AgentError::Invalid(_)), "{id}: {err:?}");
        assert!(err.to_string().contains(expected), "{id}: {err}");
        assert!(pods.is_empty(), "{id}: nothing held");
    }
    assert_eq!(
        pods.counters()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    // A limit within the slot is taken.
    let mut within = workload("fits", wat(HELLO));
    within.memory_limit = Some(SLOT);
    pods.create(within).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_pod_whose_name_a_deployed_workload_has_is_refused_naming_name() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, pods) = runtime(dir.path()).await;
    let counter = dir.path().join("counter.wasm");
    std::fs::write(&counter, crate::embedded::COUNTER).unwrap();
    let deployment = format!(
        "[[workloads]]\nname = \"blink-hello\"\nmodule = \"{}\"\n",
        counter.display()
    );
    agent
        .deploy_text("d.toml", &deployment, dir.path())
        .await
        .expect("the operator's workload deploys");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let rows = Control::ps(&agent).await;
        if rows.len() == 1 && rows[0].state == WorkloadState::Running {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never running: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The pod is named `blink-hello` from its pod and container names: the operator's.
    pods.create(workload("hello", wat(HELLO))).await.unwrap();
    let err = pods.start("hello").await.expect_err("the clash is refused");
    assert!(matches!(err, AgentError::Invalid(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("name:") && text.contains("belongs to source operator"),
        "{text}"
    );
    assert_eq!(pods.status("hello").await.unwrap(), PodStatus::Created);

    // The deployed workload keeps running, unchanged, and still answers.
    let after = Control::ps(&agent).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].source, "operator");
    assert_eq!(after[0].state, WorkloadState::Running);
    assert_eq!(after[0].module_digest, before[0].module_digest);
    Control::send(
        &agent,
        "blink-hello",
        crate::api::types::SendRequest {
            command: "get".into(),
            payload: String::new(),
        },
    )
    .await
    .expect("the deployed workload answers");
    // The refused pod is removed cleanly and never touched the operator's workload.
    pods.remove("hello").await.unwrap();
    assert_eq!(Control::ps(&agent).await.len(), 1);
}
