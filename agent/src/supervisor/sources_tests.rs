//! Multi-source deployments with real state stores: the union checks (each refusal names the
//! field and changes nothing), an operator deploy beside pods and device functions, restore
//! of every source, and a WASI command's exit code through `wait_workload`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::{Agent, AgentOptions, Labels, Source, WorkloadEnd};
use crate::api::control::Control;
use crate::api::types::{ErrorCode, WorkloadStatus};
use crate::deployment::{Artifact, RestartPolicy, WorkloadSpec, WorkloadState};
use crate::runtime::wasm::EngineOptions;

async fn open(dir: &Path, max_instances: u32) -> Agent {
    Agent::open(AgentOptions {
        state_dir: dir.to_path_buf(),
        engine: EngineOptions {
            max_instances,
            ..EngineOptions::default()
        },
        logs: crate::logs::LogOptions::default(),
        persisted_log_lines: 100,
        board: "sim".into(),
        images: Default::default(),
    })
    .await
    .expect("agent opens")
}

fn counter(dir: &Path) -> String {
    let path = dir.join("counter.wasm");
    std::fs::write(&path, crate::embedded::COUNTER).expect("write counter");
    path.display().to_string()
}

/// One workload of a deployment snippet, as a source's API call would give it.
fn spec(dir: &Path, toml: &str) -> WorkloadSpec {
    crate::deployment::parse("spec.toml", &format!("[[workloads]]\n{toml}\n"), dir)
        .expect("the test spec parses")
        .spec
        .workloads
        .remove(0)
}

fn counter_spec(dir: &Path, name: &str, gpio: &str) -> WorkloadSpec {
    let module = counter(dir);
    spec(
        dir,
        &format!(
            "name = \"{name}\"\nmodule = \"{module}\"\ntriggers = [{{ interval = \"1h\" }}]\n{gpio}"
        ),
    )
}

fn pod_labels(pod: &str) -> Labels {
    Labels::of([("namespace", "default"), ("pod", pod), ("container", "app")])
}

async fn ps(agent: &Agent) -> Vec<(String, String, WorkloadState)> {
    agent
        .ps()
        .await
        .into_iter()
        .map(|w| (w.name, w.source, w.state))
        .collect()
}

async fn status(agent: &Agent, name: &str) -> Option<WorkloadStatus> {
    agent.ps().await.into_iter().find(|w| w.name == name)
}

/// Waits (up to 60 s) for `name` to reach `state`.
async fn wait_state(agent: &Agent, name: &str, state: WorkloadState) {
    for _ in 0..6000 {
        if status(agent, name).await.is_some_and(|w| w.state == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never reached {state}: {:?}",
        status(agent, name).await
    );
}

/// The stored workloads with their sources, straight from the database.
fn stored(agent: &Agent) -> Vec<(String, String, String)> {
    agent
        .store()
        .all_workloads()
        .expect("reads")
        .into_iter()
        .map(|(row, source, labels)| (row.name, source, labels))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_union_checks_refuse_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = open(&dir.path().join("state"), 3).await;
    let module = counter(dir.path());
    agent
        .deploy_text(
            "op.toml",
            &format!(
                "[[workloads]]\nname = \"op\"\nmodule = \"{module}\"\ntriggers = [{{ interval = \"1h\" }}]\ngpio = [{{ name = \"led\", pin = \"GPIO17\", mode = \"output\" }}]\n"
            ),
            dir.path(),
        )
        .await
        .expect("the operator deploys");
    agent
        .upsert_workload(
            Source::Devices,
            counter_spec(
                dir.path(),
                "dev",
                "gpio = [{ name = \"led\", pin = \"GPIO22\", mode = \"output\" }]",
            ),
            Labels::of([("device", "default/led-1")]),
        )
        .await
        .expect("a device function beside it");
    wait_state(&agent, "dev", WorkloadState::Running).await;
    wait_state(&agent, "op", WorkloadState::Running).await;
    let before_ps = ps(&agent).await;
    let before_db = stored(&agent);

    let refusals: [(Source, WorkloadSpec, &str); 4] = [
        // A name the operator owns.
        (
            Source::Pods,
            counter_spec(dir.path(), "op", ""),
            "workload \"op\": name: ",
        ),
        // A name another non-operator source owns.
        (
            Source::Pods,
            counter_spec(dir.path(), "dev", ""),
            "workload \"dev\": name: ",
        ),
        // A pin the operator's workload owns.
        (
            Source::Pods,
            counter_spec(
                dir.path(),
                "p",
                "gpio = [{ name = \"x\", pin = \"GPIO17\", mode = \"input\" }]",
            ),
            "workload \"p\": gpio[0].pin: ",
        ),
        // A pin not on the board.
        (
            Source::Devices,
            counter_spec(
                dir.path(),
                "q",
                "gpio = [{ name = \"x\", pin = \"GPIO99\", mode = \"input\" }]",
            ),
            "workload \"q\": gpio[0].pin: ",
        ),
    ];
    for (source, spec, prefix) in refusals {
        let err = agent
            .upsert_workload(source, spec, pod_labels("p"))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{}", err.error);
        assert!(err.error.starts_with(prefix), "{} / {prefix}", err.error);
        assert_eq!(ps(&agent).await, before_ps);
        assert_eq!(stored(&agent), before_db);
    }
    // A pin a device owns, refused to the operator's deployment, naming the file's field.
    let err = agent
        .deploy_text(
            "op.toml",
            &format!(
                "[[workloads]]\nname = \"op\"\nmodule = \"{module}\"\ngpio = [{{ name = \"led\", pin = \"GPIO22\", mode = \"output\" }}]\n"
            ),
            dir.path(),
        )
        .await
        .unwrap_err();
    assert!(
        err.error.contains("workloads[0].gpio[0].pin: pin \"GPIO22\" is already granted to workload \"dev\" of source devices"),
        "{}",
        err.error
    );
    // A name a device owns, refused to the operator.
    let err = agent
        .deploy_text(
            "op.toml",
            &format!("[[workloads]]\nname = \"dev\"\nmodule = \"{module}\"\n"),
            dir.path(),
        )
        .await
        .unwrap_err();
    assert!(
        err.error
            .contains("workloads[0].name: workload \"dev\" belongs to source devices"),
        "{}",
        err.error
    );
    assert_eq!(ps(&agent).await, before_ps);
    assert_eq!(stored(&agent), before_db);

    // The pool: 3 slots, 2 taken (op, dev); a pod fits, a fourth Wasm workload does not.
    agent
        .upsert_workload(
            Source::Pods,
            counter_spec(dir.path(), "p1", ""),
            pod_labels("p1"),
        )
        .await
        .expect("the third slot");
    wait_state(&agent, "p1", WorkloadState::Running).await;
    let before_ps = ps(&agent).await;
    let before_db = stored(&agent);
    let err = agent
        .upsert_workload(
            Source::Pods,
            counter_spec(dir.path(), "p2", ""),
            pod_labels("p2"),
        )
        .await
        .unwrap_err();
    assert!(
        err.error.starts_with("workload \"p2\": kind: "),
        "{}",
        err.error
    );
    assert!(err.error.contains("wasm.max-instances"), "{}", err.error);
    assert_eq!(ps(&agent).await, before_ps);
    assert_eq!(stored(&agent), before_db);
    // ... and the operator cannot take it either: its deployment must fit beside them.
    let err = agent
        .deploy_text(
            "op.toml",
            &format!(
                "[[workloads]]\nname = \"op\"\nmodule = \"{module}\"\n[[workloads]]\nname = \"op2\"\nmodule = \"{module}\"\n"
            ),
            dir.path(),
        )
        .await
        .unwrap_err();
    assert!(err.error.contains("need 4 instance slots"), "{}", err.error);
    assert_eq!(stored(&agent), before_db);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deploy_leaves_pods_and_device_workloads_running() {
    let dir = tempfile::tempdir().unwrap();
    let agent = open(&dir.path().join("state"), 8).await;
    let module = counter(dir.path());
    agent
        .upsert_workload(
            Source::Pods,
            counter_spec(dir.path(), "web", ""),
            pod_labels("web"),
        )
        .await
        .expect("pod");
    agent
        .upsert_workload(
            Source::Devices,
            counter_spec(
                dir.path(),
                "led",
                "gpio = [{ name = \"led\", pin = \"GPIO22\", mode = \"output\" }]",
            ),
            Labels::of([("device", "default/led-1")]),
        )
        .await
        .expect("device");
    wait_state(&agent, "web", WorkloadState::Running).await;
    wait_state(&agent, "led", WorkloadState::Running).await;
    let started = |w: &WorkloadStatus| (w.deployment_version, w.restarts);
    let web = status(&agent, "web").await.unwrap();
    let led = status(&agent, "led").await.unwrap();
    assert_eq!(web.source, "pods");
    assert_eq!(web.labels.get("pod").map(String::as_str), Some("web"));
    assert_eq!(led.source, "devices");

    let report = agent
        .deploy_text(
            "op.toml",
            &format!("[[workloads]]\nname = \"op\"\nmodule = \"{module}\"\n"),
            dir.path(),
        )
        .await
        .expect("deploys");
    assert_eq!(report.started, vec!["op".to_string()]);
    assert!(report.stopped.is_empty(), "{report:?}");
    let report = agent
        .deploy_text("empty.toml", "workloads = []\n", dir.path())
        .await
        .expect("deploys nothing");
    assert_eq!(
        report.stopped,
        vec!["op".to_string()],
        "only the operator's own"
    );
    let names: Vec<(String, String, WorkloadState)> = ps(&agent).await;
    assert_eq!(
        names,
        vec![
            ("led".into(), "devices".into(), WorkloadState::Running),
            ("web".into(), "pods".into(), WorkloadState::Running),
        ]
    );
    // The same instances: not restarted, not redeployed.
    assert_eq!(
        started(&status(&agent, "web").await.unwrap()),
        started(&web)
    );
    assert_eq!(
        started(&status(&agent, "led").await.unwrap()),
        started(&led)
    );
    // Removing a pod leaves the device function.
    agent
        .remove_workload(Source::Pods, "web")
        .await
        .expect("removed");
    let err = agent
        .remove_workload(Source::Pods, "led")
        .await
        .unwrap_err();
    assert!(
        err.error.starts_with("workload \"led\": name: "),
        "{}",
        err.error
    );
    let err = agent
        .remove_workload(Source::Pods, "web")
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(
        ps(&agent).await,
        vec![("led".into(), "devices".into(), WorkloadState::Running)]
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_after_a_restart_keeps_operator_and_devices_and_drops_pods() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let module = counter(dir.path());
    {
        let agent = open(&state, 8).await;
        agent
            .deploy_text(
                "op.toml",
                &format!("[[workloads]]\nname = \"op\"\nmodule = \"{module}\"\n"),
                dir.path(),
            )
            .await
            .expect("deploys");
        agent
            .upsert_workload(
                Source::Pods,
                counter_spec(dir.path(), "web", ""),
                pod_labels("web"),
            )
            .await
            .expect("pod");
        agent
            .upsert_workload(
                Source::Devices,
                counter_spec(dir.path(), "led", ""),
                Labels::of([("device", "default/led-1")]),
            )
            .await
            .expect("device");
        agent
            .upsert_workload(
                Source::Pods,
                counter_spec(dir.path(), "gone", ""),
                pod_labels("gone"),
            )
            .await
            .expect("pod");
        agent
            .remove_workload(Source::Pods, "gone")
            .await
            .expect("removed");
        agent.shutdown().await;
    }
    // Only the module's copy in the artifact store is left: the file goes.
    std::fs::remove_file(&module).unwrap();
    let agent = open(&state, 8).await;
    assert!(agent.restore().await.expect("restores"));
    for name in ["led", "op"] {
        wait_state(&agent, name, WorkloadState::Running).await;
    }
    // Pods are not restored (containerd saw them exit with the agent): dropped from the store.
    assert_eq!(
        ps(&agent).await,
        vec![
            ("led".into(), "devices".into(), WorkloadState::Running),
            ("op".into(), "operator".into(), WorkloadState::Running),
        ]
    );
    let stored: Vec<String> = agent
        .store()
        .all_workloads()
        .unwrap()
        .into_iter()
        .map(|(row, _, _)| row.name)
        .collect();
    assert_eq!(stored, ["led", "op"], "the stored pod was dropped");
    // The operator's history has only its own deployment.
    let history = agent.store().deployment_history(10).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].source_name, "op.toml");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_workload_gives_a_commands_exit_code_args_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let agent = open(&dir.path().join("state"), 8).await;
    let module = lichen_test_programs::HELLO_WASI;
    let mut command = spec(
        dir.path(),
        &format!("name = \"job\"\nmodule = \"{module}\"\nrestart = \"never\"\n"),
    );
    assert_eq!(command.restart, RestartPolicy::Never);
    let Artifact::Wasm(wasm) = &mut command.artifact else {
        panic!("a wasm workload")
    };
    wasm.args = vec!["one".into(), "two words".into()];
    wasm.env = BTreeMap::from([("LICHEN_EXIT".to_string(), "3".to_string())]);
    let mut changes = agent.status_changes();
    agent
        .upsert_workload(Source::Pods, command.clone(), pod_labels("job"))
        .await
        .expect("the command is accepted");
    assert_eq!(
        agent.wait_workload("job").await.expect("it ends"),
        WorkloadEnd::Exited(3)
    );
    // The change that ended it is broadcast (once recorded, which may follow the wait).
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let change = changes.recv().await.expect("changes keep coming");
            if change.workload == "job" && change.state == WorkloadState::Failed {
                break;
            }
        }
    })
    .await
    .expect("the failed status is broadcast");
    let lines: Vec<String> = agent
        .logs("job", 50)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .collect();
    for expected in [
        "hello from wasi",
        "LICHEN_EXIT=3",
        "arg=one",
        "arg=two words",
    ] {
        assert!(lines.iter().any(|l| l == expected), "{expected}: {lines:?}");
    }
    // Run once more, exiting 0; an ended workload answers at once.
    if let Artifact::Wasm(wasm) = &mut command.artifact {
        wasm.env.insert("LICHEN_EXIT".into(), "0".into());
    }
    agent
        .upsert_workload(Source::Pods, command, pod_labels("job"))
        .await
        .expect("replaced");
    assert_eq!(
        agent.wait_workload("job").await.unwrap(),
        WorkloadEnd::Exited(0)
    );
    assert_eq!(
        agent.wait_workload("job").await.unwrap(),
        WorkloadEnd::Exited(0)
    );
    let err = agent.wait_workload("nobody").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // Stopping a long-running workload ends its waiters with `Stopped`.
    agent
        .upsert_workload(
            Source::Pods,
            counter_spec(dir.path(), "long", ""),
            pod_labels("long"),
        )
        .await
        .unwrap();
    wait_state(&agent, "long", WorkloadState::Running).await;
    let waiter = tokio::spawn({
        let agent = agent.clone();
        async move { agent.wait_workload("long").await }
    });
    agent.stop("long").await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), WorkloadEnd::Stopped);
    agent.remove_workload(Source::Pods, "long").await.unwrap();
    assert!(status(&agent, "long").await.is_none());
    agent.shutdown().await;
}
