//! The supervisor with real state stores: stored deployments out of bounds, the pool's slots,
//! garbage collection of artifacts, `ps` during a deploy.

use std::path::Path;
use std::time::Duration;

use super::{Agent, AgentOptions};
use crate::api::control::Control;
use crate::deployment::WorkloadState;
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

/// Writes the counter guest beside the deployment files and returns its path.
fn counter(dir: &Path) -> String {
    let path = dir.join("counter.wasm");
    std::fs::write(&path, crate::embedded::COUNTER).expect("write counter");
    path.display().to_string()
}

fn workloads(module: &str, names: &[&str], extra: &str) -> String {
    names
        .iter()
        .map(|name| format!("[[workloads]]\nname = \"{name}\"\nmodule = \"{module}\"\n{extra}\n"))
        .collect()
}

async fn state_of(agent: &Agent, name: &str) -> Option<crate::api::types::WorkloadStatus> {
    agent.ps().await.into_iter().find(|w| w.name == name)
}

/// Waits (up to 60 s) until `name` is in `state`.
async fn wait_state(agent: &Agent, name: &str, state: WorkloadState) {
    for _ in 0..6000 {
        if state_of(agent, name)
            .await
            .is_some_and(|w| w.state == state)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never reached {state}: {:?}",
        state_of(agent, name).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_deployment_out_of_bounds_fails_those_workloads_and_runs_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let module = counter(dir.path());
    let state = dir.path().join("state");
    {
        let agent = open(&state, 8).await;
        let text = workloads(
            &module,
            &["good", "ticks", "queue", "garbled"],
            "triggers = [{ interval = \"1s\" }]",
        );
        agent
            .deploy_text("deploy.toml", &text, dir.path())
            .await
            .expect("deploys");
        agent.shutdown().await;
    }
    // What an older agent without bounds would have stored, written into the real database.
    let db = rusqlite::Connection::open(state.join("lichen.db")).unwrap();
    let spec = |name: &str| -> String {
        db.query_row(
            "SELECT spec_json FROM workloads WHERE name = ?1",
            [name],
            |row| row.get(0),
        )
        .unwrap()
    };
    let ticks = spec("ticks").replace("\"1s\"", "\"500000000000years\"");
    let queue = spec("queue").replace(
        "\"limits\":{}",
        "\"limits\":{\"queue\":4000000000000000000}",
    );
    assert!(queue.contains("4000000000000000000"), "{queue}");
    for (name, json) in [
        ("ticks", ticks),
        ("queue", queue),
        ("garbled", "{\"name\":".into()),
    ] {
        db.execute(
            "UPDATE workloads SET spec_json = ?1 WHERE name = ?2",
            [json.as_str(), name],
        )
        .unwrap();
    }
    drop(db);

    let agent = open(&state, 8).await;
    assert!(
        agent
            .restore()
            .await
            .expect("restore never fails on a workload")
    );
    wait_state(&agent, "good", WorkloadState::Running).await;
    let ticks = state_of(&agent, "ticks").await.expect("listed");
    assert_eq!(ticks.state, WorkloadState::Failed);
    let error = ticks.last_error.unwrap_or_default();
    assert!(
        error.contains("triggers[0].interval") && error.contains("at most 1year"),
        "{error}"
    );
    let queue = state_of(&agent, "queue").await.expect("listed");
    assert_eq!(queue.state, WorkloadState::Failed);
    let error = queue.last_error.unwrap_or_default();
    assert!(
        error.contains("limits.queue") && error.contains("1 to 4096"),
        "{error}"
    );
    let garbled = state_of(&agent, "garbled").await.expect("listed");
    assert_eq!(garbled.state, WorkloadState::Failed);
    assert!(
        garbled
            .last_error
            .unwrap_or_default()
            .contains("stored spec is unreadable"),
    );
    let events = agent.events(0, 1000).await.unwrap();
    for name in ["ticks", "queue", "garbled"] {
        assert!(
            events.iter().any(|e| e.kind == "start-failed"
                && e.workload.as_deref() == Some(name)
                && e.detail.contains("deploy a corrected deployment")),
            "no start-failed event for {name}: {events:?}"
        );
    }
    let refused = agent
        .send(
            "ticks",
            crate::api::types::SendRequest {
                command: "status".into(),
                payload: String::new(),
            },
        )
        .await
        .expect_err("a failed workload takes no commands");
    assert!(refused.error.contains("is failed"), "{}", refused.error);

    // A corrected deployment replaces them.
    let text = workloads(&module, &["good", "ticks"], "");
    agent
        .deploy_text("fixed.toml", &text, dir.path())
        .await
        .expect("deploys");
    wait_state(&agent, "ticks", WorkloadState::Running).await;
    assert!(state_of(&agent, "queue").await.is_none());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_an_unchecked_spec_clamps_it_instead_of_panicking() {
    // The bounds are checked before any runtime sees a spec; the worker still clamps what it
    // gives tokio, so an interval of years or a queue of 4e18 cannot panic it.
    let dir = tempfile::tempdir().unwrap();
    let agent = open(dir.path(), 8).await;
    let artifact = agent
        .artifacts()
        .add(crate::embedded::COUNTER.to_vec())
        .await
        .unwrap();
    let mut spec: crate::deployment::WorkloadSpec = serde_json::from_str(&format!(
        r#"{{"name":"wild","module":{{"digest":"{}"}}}}"#,
        artifact.digest()
    ))
    .unwrap();
    spec.triggers = vec![crate::deployment::Trigger::Interval(Duration::MAX)];
    spec.limits.queue = Some(usize::MAX);
    spec.limits.time_slice = Some(Duration::MAX);
    let runtime = agent.runtime(crate::runtime::Tier::Wasm).unwrap();
    let workload = runtime.start(
        crate::runtime::Prepared::Wasm(artifact),
        spec,
        crate::runtime::StartInfo {
            version: 1,
            kv: Default::default(),
            events_handled: 0,
        },
    );
    for _ in 0..6000 {
        if workload.status().state == WorkloadState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(workload.status().state, WorkloadState::Running);
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    workload
        .try_deliver(
            crate::runtime::Delivery::Command {
                id: "c1".into(),
                name: "get".into(),
                payload: Vec::new(),
                hub: None,
            },
            Some(reply_tx),
        )
        .expect("queued");
    let reply = reply_rx.await.expect("answered");
    assert!(reply.is_ok(), "{reply:?}");
    workload.stop().await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_wasm_workloads_than_instance_slots_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let module = counter(dir.path());
    let agent = open(&dir.path().join("state"), 4).await;
    let five = workloads(&module, &["a", "b", "c", "d", "e"], "");
    let error = agent
        .deploy_text("five.toml", &five, dir.path())
        .await
        .expect_err("five do not fit four slots");
    assert_eq!(error.code, crate::api::types::ErrorCode::Invalid);
    assert!(
        error
            .error
            .starts_with("five.toml: workloads: 5 Wasm workloads need 5 instance slots")
            && error
                .error
                .contains("has 4 (`wasm.max-instances` in the agent config)"),
        "{}",
        error.error
    );
    assert!(agent.ps().await.is_empty(), "nothing changed");

    // Three fit; reloading all three at once would need six slots.
    let three = workloads(&module, &["a", "b", "c"], "");
    agent
        .deploy_text("three.toml", &three, dir.path())
        .await
        .expect("three fit");
    for name in ["a", "b", "c"] {
        wait_state(&agent, name, WorkloadState::Running).await;
    }
    let changed = workloads(&module, &["a", "b", "c"], "[workloads.config]\nstep = 2");
    let error = agent
        .deploy_text("changed.toml", &changed, dir.path())
        .await
        .expect_err("three reloads do not fit");
    assert!(
        error.error.contains("3 Wasm workloads and 3 hot reloads")
            && error.error.contains("need 6 instance slots"),
        "{}",
        error.error
    );
    let versions: Vec<u64> = agent
        .ps()
        .await
        .iter()
        .map(|w| w.deployment_version)
        .collect();
    assert_eq!(versions, vec![1, 1, 1], "nothing changed");
    agent.shutdown().await;
}

/// Files of the artifact store, by name.
fn artifact_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deploys_leave_no_artifact_and_unused_ones_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let module = counter(dir.path());
    let agent = open(&state, 8).await;
    agent
        .deploy_text(
            "good.toml",
            &workloads(&module, &["counter"], ""),
            dir.path(),
        )
        .await
        .expect("deploys");
    let kept = artifact_files(&state);
    assert_eq!(kept.len(), 3, "source, compilation, checksum: {kept:?}");

    // A component that compiles but does not link against the world: refused, nothing stays.
    let foreign = dir.path().join("foreign.wasm");
    let wat = r#"(component (import "acme:robot/arm@1.0.0" (instance (export "grab" (func)))))"#;
    std::fs::write(&foreign, wat::parse_str(wat).unwrap()).unwrap();
    // A valid component beside a refused one: compiled, then refused with the deployment.
    let thermostat = dir.path().join("thermostat.wasm");
    std::fs::write(&thermostat, crate::embedded::THERMOSTAT).unwrap();
    for _ in 0..3 {
        let text = format!(
            "{}{}",
            workloads(&thermostat.display().to_string(), &["t"], ""),
            workloads(&foreign.display().to_string(), &["f"], "")
        );
        let error = agent
            .deploy_text("bad.toml", &text, dir.path())
            .await
            .expect_err("refused");
        assert!(
            error.error.contains("workloads[1].module"),
            "{}",
            error.error
        );
        assert_eq!(artifact_files(&state), kept, "a refused deploy left files");
    }

    // Replaced by another module: the old one's files go.
    let thermostat_only = workloads(&thermostat.display().to_string(), &["t"], "");
    agent
        .deploy_text("next.toml", &thermostat_only, dir.path())
        .await
        .expect("deploys");
    let now = artifact_files(&state);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.iter().all(|name| !kept.contains(name)), "{now:?}");

    // Leftovers of another agent (a stale compilation, a temporary file) go at start.
    agent.shutdown().await;
    drop(agent);
    let stale = state
        .join("artifacts")
        .join(format!("{}.0123456789abcdef.cwasm", "ab".repeat(32)));
    std::fs::write(&stale, b"stale").unwrap();
    let temporary = state.join("artifacts").join(".x.wasm.1.0.tmp");
    std::fs::write(&temporary, b"half").unwrap();
    let agent = open(&state, 8).await;
    assert!(agent.restore().await.unwrap());
    assert_eq!(artifact_files(&state), now);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_added_for_a_later_deployment_survive_collection_until_used() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let module = counter(dir.path());
    let agent = open(&state, 8).await;
    // As a hub transfer or a bundle does: added before the deployment that names it.
    let thermostat = agent
        .artifacts()
        .add(crate::embedded::THERMOSTAT.to_vec())
        .await
        .unwrap();
    agent
        .deploy_text(
            "one.toml",
            &workloads(&module, &["counter"], ""),
            dir.path(),
        )
        .await
        .expect("deploys");
    assert!(
        agent.artifacts().contains(thermostat.digest()),
        "kept for later"
    );
    let text = format!(
        "{}[[workloads]]\nname = \"t\"\nmodule = \"sha256:{}\"\n",
        workloads(&module, &["counter"], ""),
        thermostat.digest()
    );
    agent
        .deploy_text("two.toml", &text, dir.path())
        .await
        .expect("deploys by digest");
    agent
        .deploy_text(
            "three.toml",
            &workloads(&module, &["counter"], ""),
            dir.path(),
        )
        .await
        .expect("deploys");
    assert!(
        !agent.artifacts().contains(thermostat.digest()),
        "no longer kept once a deployment used it and the next dropped it"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_paths_naming_a_fifo_or_a_device_are_refused_and_ps_answers_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let module = counter(dir.path());
    let agent = open(&dir.path().join("state"), 8).await;
    agent
        .deploy_text(
            "good.toml",
            &workloads(&module, &["counter"], ""),
            dir.path(),
        )
        .await
        .expect("deploys");
    let fifo = dir.path().join("fifo.wasm");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = dir.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let link = dir.path().join("big.wasm");
    std::os::unix::fs::symlink(&big, &link).unwrap();
    for (path, words) in [
        (fifo.display().to_string(), "is a FIFO, not a regular file"),
        (
            "/dev/zero".to_owned(),
            "is a character device, not a regular file",
        ),
        (
            link.display().to_string(),
            "is 3221225472 bytes, more than the 128MiB (134217728 bytes) accepted here",
        ),
    ] {
        // No writer opens the FIFO: a blocking read would never return.
        let text = workloads(&path, &["x"], "");
        let deploy = agent.deploy_text("bad.toml", &text, dir.path());
        let error = tokio::time::timeout(Duration::from_secs(60), deploy)
            .await
            .expect("the deploy returns")
            .expect_err("refused");
        assert!(
            error.error.contains("workloads[0].module") && error.error.contains(words),
            "{}",
            error.error
        );
        assert_eq!(agent.ps().await.len(), 1);
    }

    // A deploy in progress holds the deploy lock, not the workloads: `ps` answers.
    let deploying = agent.inner.deploying.lock().await;
    let waiting = tokio::spawn({
        let agent = agent.clone();
        let text = workloads(&module, &["counter"], "");
        let base = dir.path().to_path_buf();
        async move { agent.deploy_text("again.toml", &text, &base).await }
    });
    let rows = tokio::time::timeout(Duration::from_secs(60), agent.ps())
        .await
        .expect("ps does not wait for the deploy");
    assert_eq!(rows.len(), 1);
    assert!(!waiting.is_finished());
    drop(deploying);
    waiting
        .await
        .unwrap()
        .expect("the waiting deploy goes through");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_deploy_is_held_in_prepare_ps_and_send_answer_and_it_completes_after() {
    let dir = tempfile::tempdir().unwrap();
    let module = counter(dir.path());
    let agent = open(&dir.path().join("state"), 8).await;
    agent
        .deploy_text(
            "one.toml",
            &workloads(&module, &["counter"], ""),
            dir.path(),
        )
        .await
        .expect("deploys");
    wait_state(&agent, "counter", WorkloadState::Running).await;

    let hook = std::sync::Arc::new(super::PrepareHook::default());
    *agent.inner.prepare_hook.lock().unwrap() = Some(hook.clone());
    let deploy = tokio::spawn({
        let agent = agent.clone();
        let text = workloads(&module, &["counter", "second"], "");
        let base = dir.path().to_path_buf();
        async move { agent.deploy_text("two.toml", &text, &base).await }
    });
    tokio::time::timeout(Duration::from_secs(60), hook.entered.notified())
        .await
        .expect("the deploy reaches prepare");

    // Held inside prepare: the deploy lock is taken, the workloads lock is not.
    let rows = tokio::time::timeout(Duration::from_secs(60), agent.ps())
        .await
        .expect("ps answers during the deploy");
    assert_eq!(
        rows.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["counter"]
    );
    let request = crate::api::types::SendRequest {
        command: "get".into(),
        payload: String::new(),
    };
    let reply = tokio::time::timeout(Duration::from_secs(60), agent.send("counter", request))
        .await
        .expect("send answers during the deploy")
        .expect("counter takes the command");
    let count = reply.reply.expect("get replies with the count");
    assert!(count.parse::<u64>().is_ok(), "not a count: {count:?}");
    assert!(
        !deploy.is_finished(),
        "the deploy went past the held prepare"
    );

    hook.release.notify_one();
    tokio::time::timeout(Duration::from_secs(60), deploy)
        .await
        .expect("the deploy completes once released")
        .unwrap()
        .expect("the deploy goes through");
    wait_state(&agent, "second", WorkloadState::Running).await;
    assert!(state_of(&agent, "counter").await.is_some());
    agent.shutdown().await;
}

/// `doctor` carries the line of every part the daemon started beside the agent (the KubeEdge
/// mapper adds its EdgeCore line this way), run with the agent, without the supervisor
/// knowing the part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_the_checks_added_beside_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = open(dir.path(), 4).await;
    let before = agent.doctor().await;
    assert!(!before.checks.iter().any(|c| c.name == "beside"));
    agent.add_doctor_check(std::sync::Arc::new(|agent: &Agent| {
        crate::api::types::DoctorCheck {
            name: "beside".into(),
            status: "ok".into(),
            detail: format!("sees board {}", agent.inner.board),
        }
    }));
    let report = agent.doctor().await;
    let line = report
        .checks
        .iter()
        .find(|c| c.name == "beside")
        .expect("the added check is in the report");
    assert_eq!(line.detail, "sees board sim");
    assert_eq!(report.checks.len(), before.checks.len() + 1);
}
