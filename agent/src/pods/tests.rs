//! The pod runtime on the agent's real engine: programs run, stream, end, stop and are
//! refused as containerd's task service sees them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lichen_shim::spec::PodIdentity;
use lichen_shim::{AgentError, Exit, PodAgent, PodWorkload, WorkloadStatus as PodStatus};

use super::PodRuntime;
use crate::logs::{LogHub, LogOptions};
use crate::runtime::wasm::{ArtifactStore, EngineOptions, WasmEngine};

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

fn runtime(dir: &std::path::Path) -> PodRuntime {
    let engine = Arc::new(
        WasmEngine::new(EngineOptions {
            max_instances: 8,
            max_memory_bytes: SLOT,
            ..EngineOptions::default()
        })
        .expect("engine builds"),
    );
    let artifacts = Arc::new(ArtifactStore::open(dir, engine).expect("store opens"));
    PodRuntime::new(artifacts, Arc::new(LogHub::new(LogOptions::default())))
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
    let pods = runtime(dir.path());
    pods.create(workload("hello", wat(HELLO))).await.unwrap();
    assert_eq!(pods.status("hello").await.unwrap(), PodStatus::Created);
    pods.start("hello").await.unwrap();
    assert_eq!(wait(&pods, "hello").await, Exit::Code(7));
    let rows = pods.ps();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].name, "blink.hello",
        "ps names it by pod and container"
    );
    assert_eq!(rows[0].state, "failed");
    assert_eq!(rows[0].exit_code, Some(7));
    assert_eq!(rows[0].source, "pods");
    let labels = &rows[0].labels;
    assert_eq!(labels["namespace"], "default");
    assert_eq!(labels["pod"], "blink");
    assert_eq!(labels["container"], "hello");
    assert_eq!(labels["containerd-namespace"], "k8s.io");
    let lines: Vec<String> = pods
        .logs()
        .recent("blink.hello", 50)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert!(lines.iter().any(|l| l == "hello from a pod"), "{lines:?}");
    pods.remove("hello").await.unwrap();
    assert!(pods.is_empty());
    assert!(matches!(
        pods.status("hello").await,
        Err(AgentError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_streams_before_it_ends_is_stopped_and_cannot_be_removed_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let pods = runtime(dir.path());
    pods.create(workload("sleeper", wat(SLEEPER)))
        .await
        .unwrap();
    pods.start("sleeper").await.unwrap();
    // Its first line is in the log while it still runs: output is streamed, not collected.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pods
        .logs()
        .recent("blink.sleeper", 50)
        .iter()
        .any(|l| l.message == "sleeping")
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
    pods.stop("sleeper").await.unwrap();
    assert_eq!(wait(&pods, "sleeper").await, Exit::Stopped);
    pods.stop("sleeper")
        .await
        .expect("stopping an ended pod is fine");
    pods.remove("sleeper").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_reported_as_trapped() {
    let dir = tempfile::tempdir().unwrap();
    let pods = runtime(dir.path());
    let trap = wat(r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#);
    pods.create(workload("trap", trap)).await.unwrap();
    pods.start("trap").await.unwrap();
    assert!(matches!(wait(&pods, "trap").await, Exit::Trapped(_)));
    assert_eq!(pods.ps()[0].traps, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_programs_and_limits_are_refused_naming_the_field_and_nothing_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let pods = runtime(dir.path());
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
