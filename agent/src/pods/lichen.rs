//! Pods whose `.wasm` is a component of Lichen's device-function world.
//!
//! Such a pod runs as a workload of the supervisor's `pods` source (the same worker, limits,
//! key-value store, telemetry outbox and logs as a deployed device function), under a
//! workload name derived from its pod and container names, with **no device grants**: it gets
//! `wasi:keyvalue`, `wasi:config`, `wasi:logging`, the clocks, telemetry and interval ticks,
//! and nothing of the board's pins or buses. Grants are never read from the pod: anyone who
//! may create a pod in the cluster would otherwise take the node's hardware. A component that
//! imports `lichen:device/gpio`, `spi` or `i2c` is refused at `Create`, naming the import;
//! device functions that need hardware are deployed by the node's operator (`lichen deploy`).
//!
//! What the pod gives: `process.env` becomes the workload's configuration (`wasi:config` and
//! `init`'s map), except `LICHEN_INTERVAL` (a duration as deployment files write it, e.g. `500ms`), its
//! interval trigger; the OCI memory limit its memory limit. It never restarts on its own
//! (containerd or the kubelet owns restarts): a trap ends the task. Its log lines go to
//! containerd's stdout FIFO as they are written.

use std::collections::BTreeMap;
use std::time::Duration;

use lichen_shim::io::OutputSink;
use lichen_shim::spec::PodIdentity;
use lichen_shim::{AgentError, Exit};
use tokio::sync::broadcast;

use crate::api::types::{ApiError, LogLine};
use crate::deployment::{
    self, DurationError, Limits, ModuleRef, RestartPolicy, Trigger, WasmArtifact, WorkloadSpec,
};
use crate::runtime::wasm::Artifact;
use crate::supervisor::{Agent, Labels, Source, WorkloadEnd};

/// The environment variable that sets a Lichen pod's interval trigger.
pub const INTERVAL_ENV: &str = "LICHEN_INTERVAL";

/// The first device interface the component imports, with its version (`lichen:device/gpio@0.1.0`).
pub(super) fn device_import(artifact: &Artifact, engine: &wasmtime::Engine) -> Option<String> {
    let component = artifact.component()?.instance_pre().component();
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name)
        .find(|name| {
            lichen_host_apis::DEVICE_INTERFACES.iter().any(|interface| {
                name.strip_prefix(interface)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
            })
        })
        .map(str::to_string)
}

/// The interval trigger from `LICHEN_INTERVAL`, checked against the trigger's bounds.
pub(super) fn interval(env: &[(String, String)]) -> Result<Option<Duration>, String> {
    let Some((_, text)) = env.iter().rev().find(|(key, _)| key == INTERVAL_ENV) else {
        return Ok(None);
    };
    let period = crate::deployment::parse_duration_within(
        text.trim(),
        (Trigger::MIN_INTERVAL, Trigger::MAX_INTERVAL),
    )
    .map_err(|why| match why {
        DurationError::NotADuration(_) => {
            format!("process.env {INTERVAL_ENV}: {text:?} is not a duration: {why}")
        }
        DurationError::TooShort(_) | DurationError::TooLong(_) => {
            format!("process.env {INTERVAL_ENV}: {text:?} {why}")
        }
    })?;
    Ok(Some(period))
}

/// A workload name (`[a-z0-9][a-z0-9-]{0,62}`) for a pod: `<pod>-<container>` under
/// Kubernetes, else the task id, lower-cased with other characters as `-`; when `taken`
/// says another pod has it, a hash of the task id is appended.
pub(super) fn workload_name(
    id: &str,
    identity: &PodIdentity,
    taken: impl Fn(&str) -> bool,
) -> String {
    let base = match (&identity.pod_name, &identity.container_name) {
        (Some(pod), Some(container)) => format!("{pod}-{container}"),
        _ => id.to_string(),
    };
    let mut name: String = base
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let trimmed = name.trim_start_matches('-').len();
    name.drain(..name.len() - trimmed);
    if name.is_empty() {
        name = "pod".into();
    }
    name.truncate(WorkloadSpec::MAX_NAME_LEN);
    if taken(&name) {
        let suffix = &crate::runtime::wasm::sha256_hex(id.as_bytes())[..8];
        name.truncate(WorkloadSpec::MAX_NAME_LEN - suffix.len() - 1);
        name = format!("{}-{suffix}", name.trim_end_matches('-'));
    }
    name
}

/// The workload spec of a Lichen pod: its module by digest, its environment as configuration,
/// no grants, never restarted.
pub(super) fn spec(
    name: &str,
    digest: &str,
    env: &[(String, String)],
    interval: Option<Duration>,
    memory_limit: Option<u64>,
) -> WorkloadSpec {
    let config: BTreeMap<String, String> = env
        .iter()
        .filter(|(key, _)| key != INTERVAL_ENV)
        .cloned()
        .collect();
    WorkloadSpec {
        name: name.to_string(),
        isolation: None,
        artifact: deployment::Artifact::Wasm(WasmArtifact::module(ModuleRef::Digest(
            digest.to_string(),
        ))),
        config,
        triggers: interval.map(Trigger::Interval).into_iter().collect(),
        limits: Limits {
            memory_bytes: memory_limit,
            ..Limits::default()
        },
        restart: RestartPolicy::Never,
        gpio: Vec::new(),
        spi: Vec::new(),
        i2c: Vec::new(),
    }
}

/// The workload spec of a WASI command pod: its module by digest, `process.args` after the
/// first as its arguments, `process.env` as its environment (a later duplicate wins), its
/// memory limit, no grants, never restarted. Its output sink, registered under `name`, makes
/// the command runner stream it with no time slice.
pub(super) fn command_spec(
    name: &str,
    digest: &str,
    args: &[String],
    env: &[(String, String)],
    memory_limit: u64,
) -> WorkloadSpec {
    let mut spec = spec(name, digest, &[], None, Some(memory_limit));
    spec.artifact = deployment::Artifact::Wasm(WasmArtifact {
        module: ModuleRef::Digest(digest.to_string()),
        args: args.iter().skip(1).cloned().collect(),
        env: env.iter().cloned().collect(),
    });
    spec
}

/// Starts the pod's workload in the supervisor; returns its log lines, subscribed before the
/// start so `init`'s lines are not missed.
pub(super) async fn start(
    agent: &Agent,
    spec: WorkloadSpec,
    labels: Labels,
) -> Result<broadcast::Receiver<LogLine>, AgentError> {
    let name = spec.name.clone();
    let lines = crate::api::control::Control::follow_logs(agent, &name)
        .map_err(|e| AgentError::Invalid(e.error))?;
    agent
        .upsert_workload(Source::Pods, spec, labels)
        .await
        .map_err(|e| AgentError::Invalid(e.error))?;
    Ok(lines)
}

/// Writes each log line as `<level> <context>: <message>` to `sink` until `end` fires, then
/// the lines already queued.
pub(super) async fn forward_lines(
    mut lines: broadcast::Receiver<LogLine>,
    sink: Option<OutputSink>,
    mut end: tokio::sync::oneshot::Receiver<()>,
) {
    let write = |line: LogLine| {
        let sink = sink.clone();
        async move {
            if let Some(sink) = sink {
                let text = format!("{} {}: {}\n", line.level, line.context, line.message);
                sink.write(text.as_bytes()).await;
            }
        }
    };
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Ok(line) => write(line).await,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = &mut end => break,
        }
    }
    while let Ok(line) = lines.try_recv() {
        write(line).await;
    }
}

/// Waits for the pod's workload to end, as containerd's exit.
pub(super) async fn wait(agent: &Agent, name: &str) -> Exit {
    match agent.wait_workload(name).await {
        Ok(WorkloadEnd::Exited(code)) => Exit::Code(code),
        Ok(WorkloadEnd::Failed(reason)) => Exit::Trapped(reason),
        Ok(WorkloadEnd::Stopped) | Err(_) => Exit::Stopped,
    }
}

/// Stops the pod's workload (kept in `ps` as stopped until the task is deleted).
pub(super) async fn stop(agent: &Agent, name: &str) -> Result<(), ApiError> {
    crate::api::control::Control::stop(agent, name).await
}

/// Removes the pod's workload from the supervisor; one already gone is fine.
pub(super) async fn remove(agent: &Agent, name: &str) {
    if let Err(e) = agent.remove_workload(Source::Pods, name).await
        && e.code != crate::api::types::ErrorCode::NotFound
    {
        tracing::warn!(workload = %name, "cannot remove a pod's workload: {}", e.error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_are_valid_and_unique() {
        let k8s = PodIdentity {
            pod_name: Some("Web_Pod".into()),
            container_name: Some("app".into()),
            ..PodIdentity::default()
        };
        assert_eq!(workload_name("x", &k8s, |_| false), "web-pod-app");
        let taken = workload_name("x", &k8s, |n| n == "web-pod-app");
        assert!(taken.starts_with("web-pod-app-") && taken.len() == "web-pod-app-".len() + 8);
        let long = "a".repeat(200);
        let name = workload_name(&long, &PodIdentity::default(), |_| true);
        assert!(name.len() <= WorkloadSpec::MAX_NAME_LEN, "{name}");
        assert_eq!(
            workload_name("--", &PodIdentity::default(), |_| false),
            "pod"
        );
        assert_eq!(
            workload_name("-Run.1", &PodIdentity::default(), |_| false),
            "run-1"
        );
    }

    #[test]
    fn the_interval_comes_from_lichen_interval_within_bounds() {
        let env = |v: &str| vec![(INTERVAL_ENV.to_string(), v.to_string())];
        assert_eq!(interval(&[]).unwrap(), None);
        assert_eq!(
            interval(&env("250ms")).unwrap(),
            Some(Duration::from_millis(250))
        );
        for bad in ["soon", "0s", "2y"] {
            let err = interval(&env(bad)).unwrap_err();
            assert!(err.contains("process.env LICHEN_INTERVAL"), "{err}");
        }
    }
}
