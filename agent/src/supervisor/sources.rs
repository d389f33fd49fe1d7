//! The node's desired state as the union of sources, and the API the integrations use.
//!
//! Three sources each own their workloads, stored in the state database with their source and
//! labels: [`Source::Operator`] (deployment files, `lichen deploy`, the hub's desired state,
//! bundles: whole deployments), [`Source::Pods`] (the containerd shim) and [`Source::Devices`]
//! (the KubeEdge mapper), which add and remove one workload at a time
//! ([`Agent::upsert_workload`], [`Agent::remove_workload`]). Applying one source's change
//! validates the union (names unique across sources, a pin owned by one workload, the engine's
//! instance slots, grants against the board), commits atomically, then reconciles only that
//! source's workloads: an operator deploy never stops a pod or a device function, and a pod
//! never touches the operator's workloads. `docs/architecture.md` has the whole picture.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::Agent;
use super::plan::{self, Action, Desired, Scope};
use crate::api::types::ApiError;
use crate::deployment::{DeploymentSpec, ParsedDeployment, Tier, WorkloadSpec, WorkloadState};
use crate::store::{SourceWorkload, StoreError};

/// Every state change a Wasm workload records (`running`, `backoff`, `failed`, `completed`,
/// `stopped`...), as the store records it.
pub type StatusChange = crate::store::StatusUpdate;
/// A telemetry record after its event committed.
pub type CommittedTelemetry = crate::store::CommittedTelemetry;

/// Where a workload of the node's desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Deployment files, `lichen deploy`, the hub's desired state, bundles.
    Operator,
    /// Pods that containerd (Kubernetes, K3S) runs through the shim.
    Pods,
    /// Devices that KubeEdge manages through the DMI mapper.
    Devices,
}

impl Source {
    /// `operator`, `pods` or `devices`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Operator => "operator",
            Source::Pods => "pods",
            Source::Devices => "devices",
        }
    }

    /// The source of a stored name; `None` for an unknown one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "operator" => Some(Source::Operator),
            "pods" => Some(Source::Pods),
            "devices" => Some(Source::Devices),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a source says a workload is: `namespace`, `pod`, `container`, `device`. Shown by `ps`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(pub BTreeMap<String, String>);

impl Labels {
    /// Most labels on one workload.
    pub const MAX_LABELS: usize = 16;
    /// Longest label key, in bytes.
    pub const MAX_KEY_BYTES: usize = 63;
    /// Longest label value, in bytes (a Kubernetes name).
    pub const MAX_VALUE_BYTES: usize = 253;

    /// Labels from pairs.
    pub fn of<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    fn check(&self) -> Result<(), Refusal> {
        if self.0.len() > Self::MAX_LABELS {
            return Err(Refusal::invalid(
                "labels",
                format!(
                    "{} labels; at most {} are accepted",
                    self.0.len(),
                    Self::MAX_LABELS
                ),
            ));
        }
        for (key, value) in &self.0 {
            if key.is_empty()
                || key.len() > Self::MAX_KEY_BYTES
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            {
                return Err(Refusal::invalid(
                    "labels",
                    format!(
                        "invalid label key {key:?}: 1 to {} characters from a-z, A-Z, 0-9, '-', '_', '.', '/'",
                        Self::MAX_KEY_BYTES
                    ),
                ));
            }
            if value.len() > Self::MAX_VALUE_BYTES || value.chars().any(char::is_control) {
                return Err(Refusal::invalid(
                    format!("labels.{key}"),
                    format!(
                        "a label value has at most {} bytes and no control characters",
                        Self::MAX_VALUE_BYTES
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How a workload ended, for [`Agent::wait_workload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadEnd {
    /// A WASI command program returned this exit code (0 included).
    Exited(i32),
    /// It failed for good (a trap, a failed start) with this reason; its restart policy gave
    /// up or is `never`.
    Failed(String),
    /// It was stopped or removed.
    Stopped,
}

/// Why an upsert or removal was refused, with the field of the workload at fault.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The workload is invalid against the union; nothing changed.
    Invalid {
        /// Field of the workload (`name`, `gpio[1].pin`, `module`).
        field: String,
        /// Why.
        message: String,
    },
    /// Any other failure (not found, internal), as the API says it.
    Api(ApiError),
}

impl Refusal {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The refusal as an API error: `workload "x": gpio[1].pin: pin ... is already granted`.
    pub fn into_api(self, workload: &str) -> ApiError {
        match self {
            Refusal::Invalid { field, message } => {
                ApiError::invalid(format!("workload {workload:?}: {field}: {message}"))
            }
            Refusal::Api(error) => error,
        }
    }
}

/// A stored workload of the union, as the checks need it.
pub(super) struct Member {
    pub source: String,
    pub spec: WorkloadSpec,
}

impl Agent {
    /// The stored workloads of every source (those whose spec still reads).
    pub(super) async fn union(&self) -> Result<Vec<Member>, ApiError> {
        let rows = self
            .store()
            .reads()
            .all_workloads()
            .await
            .map_err(|e| ApiError::internal(format!("cannot read the workloads: {e}")))?;
        Ok(rows
            .into_iter()
            .filter_map(|(row, source, _)| {
                let spec = serde_json::from_str(&row.spec_json).ok()?;
                Some(Member { source, spec })
            })
            .collect())
    }

    /// Adds a workload to `source`, or replaces the one of that name it has (hot reload for a
    /// Wasm workload whose module or spec changed), validated like a deployment against the
    /// union of every source and committed atomically. A name that another source owns is
    /// refused naming `name`; a refused workload changes nothing.
    pub async fn upsert_workload(
        &self,
        source: Source,
        spec: WorkloadSpec,
        labels: Labels,
    ) -> Result<(), ApiError> {
        let name = spec.name.clone();
        self.upsert_checked(source, spec, labels)
            .await
            .map_err(|refusal| refusal.into_api(&name))
    }

    /// [`Agent::upsert_workload`] with the refusal's field kept apart (the KubeEdge mapper
    /// maps it back to the Device's field).
    pub async fn upsert_checked(
        &self,
        source: Source,
        spec: WorkloadSpec,
        labels: Labels,
    ) -> Result<(), Refusal> {
        if source == Source::Operator {
            return Err(Refusal::Api(ApiError::invalid(
                "source: the operator's workloads change with whole deployments (`lichen deploy`)",
            )));
        }
        let _deploying = self.inner.deploying.lock().await;
        let result = self.upsert_locked(source, spec, labels).await;
        self.collect_garbage().await;
        result
    }

    async fn upsert_locked(
        &self,
        source: Source,
        spec: WorkloadSpec,
        labels: Labels,
    ) -> Result<(), Refusal> {
        spec.check_bounds()
            .map_err(|e| Refusal::invalid(e.field, e.message))?;
        labels.check()?;
        let union = self.union().await.map_err(Refusal::Api)?;
        if let Some(owner) = union
            .iter()
            .find(|m| m.spec.name == spec.name && m.source != source.as_str())
        {
            return Err(Refusal::invalid(
                "name",
                format!(
                    "workload {:?} belongs to source {}; names are unique across sources",
                    spec.name, owner.source
                ),
            ));
        }
        let single = ParsedDeployment::from_spec(
            source.as_str(),
            DeploymentSpec {
                description: None,
                workloads: vec![spec.clone()],
            },
        );
        crate::grants::check(&single, self.inner.ctx.devices.profile()).map_err(|e| {
            let field = e.field.unwrap_or_default();
            let field = field.strip_prefix("workloads[0].").unwrap_or(&field);
            Refusal::invalid(field, e.message)
        })?;
        let others = union.iter().filter(|m| m.spec.name != spec.name);
        if let Some((field, message)) = crate::grants::owned_elsewhere(
            &spec,
            others.clone().map(|m| (m.source.as_str(), &m.spec)),
        ) {
            return Err(Refusal::invalid(field, message));
        }
        let isolation = self.isolation_for(std::slice::from_ref(&spec)).await;
        let tier = isolation
            .select(&spec)
            .map_err(|e| Refusal::invalid("isolation", e.to_string()))?;
        let runtime = self
            .runtime(tier)
            .map_err(|message| Refusal::invalid("isolation", message))?
            .clone();
        let prepared = runtime
            .prepare(&spec, None)
            .await
            .map_err(|e| Refusal::invalid(e.field, e.message))?;

        let mut workloads = self.inner.workloads.lock().await;
        let action = {
            let mut view = super::apply::current_view(&workloads, source);
            view.retain(|name, _| *name == spec.name);
            let desired = [Desired {
                spec: &spec,
                tier,
                digest: prepared.digest(),
            }];
            plan::plan(source, Scope::One, &desired, &view)
                .actions
                .into_iter()
                .next()
                .unwrap_or(Action::Start)
        };
        let unchanged = action == Action::Unchanged;
        let reload = action == Action::Reload;
        if spec.kind() == Tier::Wasm {
            let wasm = others
                .filter(|m| m.spec.kind() == Tier::Wasm)
                .count()
                .saturating_add(1)
                .saturating_add(usize::from(reload));
            let slots = self.inner.ctx.engine.options().max_instances;
            if u32::try_from(wasm).map_or(true, |wasm| wasm > slots) {
                return Err(Refusal::invalid(
                    "kind",
                    format!(
                        "this Wasm workload needs an instance slot{}, but the {slots} of this \
                         agent's engine (`wasm.max-instances`) are taken by the workloads of \
                         every source",
                        if reload {
                            " and a second one during its hot reload"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }

        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| Refusal::Api(ApiError::internal(format!("cannot encode spec: {e}"))))?;
        let labels_json = serde_json::to_string(&labels)
            .map_err(|e| Refusal::Api(ApiError::internal(format!("cannot encode labels: {e}"))))?;
        let version = self
            .store()
            .upsert_source_workload(SourceWorkload {
                source: source.as_str().into(),
                name: spec.name.clone(),
                spec_json,
                module_digest: prepared.digest().to_string(),
                labels_json,
            })
            .await
            .map_err(|e| match e {
                StoreError::OtherSource { owner, .. } => Refusal::invalid(
                    "name",
                    format!("workload {:?} belongs to source {owner}", spec.name),
                ),
                e => Refusal::Api(ApiError::internal(format!(
                    "cannot record the workload: {e}"
                ))),
            })?;

        let name = spec.name.clone();
        workloads.stopped.remove(&name);
        if unchanged {
            if let Some(current) = workloads.running.get_mut(&name) {
                current.labels = labels;
            }
            return Ok(());
        }
        if reload && let Some(current) = workloads.running.get_mut(&name) {
            current.labels = labels;
            if let Err(message) = current.workload.update(prepared, spec, version).await {
                let text = format!(
                    "reload to version {version} failed: {message}; the previous version keeps running"
                );
                current.workload.note_error(text.clone());
                return Err(Refusal::Api(ApiError::unavailable(text)));
            }
            return Ok(());
        }
        self.start_workload(
            &mut workloads,
            tier,
            prepared,
            spec,
            version,
            source,
            labels,
        )
        .await
        .map_err(Refusal::Api)?;
        tracing::info!(workload = %name, %source, version, "workload applied");
        Ok(())
    }

    /// Removes a workload of `source`: it gets `stop` (outputs to their safe state), its
    /// stored spec, state and logs go. `not-found` if `source` has no workload of that name; a
    /// name of another source is refused naming `name`.
    pub async fn remove_workload(&self, source: Source, name: &str) -> Result<(), ApiError> {
        self.remove_checked(source, name)
            .await
            .map_err(|refusal| refusal.into_api(name))
    }

    /// [`Agent::remove_workload`] with the refusal's field kept apart.
    pub async fn remove_checked(&self, source: Source, name: &str) -> Result<(), Refusal> {
        if source == Source::Operator {
            return Err(Refusal::Api(ApiError::invalid(
                "source: the operator's workloads change with whole deployments (`lichen deploy`)",
            )));
        }
        let _deploying = self.inner.deploying.lock().await;
        let union = self.union().await.map_err(Refusal::Api)?;
        match union.iter().find(|m| m.spec.name == name) {
            Some(m) if m.source != source.as_str() => {
                return Err(Refusal::invalid(
                    "name",
                    format!("workload {name:?} belongs to source {}", m.source),
                ));
            }
            Some(_) => {}
            None => {
                let running = self.inner.workloads.lock().await.running.contains_key(name);
                if !running {
                    return Err(Refusal::Api(ApiError::not_found(format!(
                        "source {source} has no workload named {name:?}"
                    ))));
                }
            }
        }
        {
            let mut workloads = self.inner.workloads.lock().await;
            if let Some(old) = workloads.running.remove(name) {
                old.workload.stop().await;
            }
            workloads.stopped.remove(name);
        }
        self.inner.ctx.logs.remove(name);
        let result = self
            .store()
            .remove_source_workload(source.as_str(), name)
            .await
            .map(drop)
            .map_err(|e| {
                Refusal::Api(ApiError::internal(format!(
                    "cannot remove the stored workload: {e}"
                )))
            });
        self.collect_garbage().await;
        result
    }

    /// Waits until the workload ends: a WASI command's exit code, a failure its restart
    /// policy gives up on, or a stop or removal. `not-found` for an unknown workload.
    pub async fn wait_workload(&self, name: &str) -> Result<WorkloadEnd, ApiError> {
        // Subscribe first, so a change between the check and the wait is not missed.
        let mut changes = self.store().status_changes();
        match self.ended(name).await {
            None => {
                return Err(ApiError::not_found(format!("no workload named {name:?}")));
            }
            Some(Some(end)) => return Ok(end),
            Some(None) => {}
        }
        loop {
            match changes.recv().await {
                Ok(change) if change.workload != name => continue,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(ApiError::unavailable("the agent is stopping"));
                }
            }
            match self.ended(name).await {
                None => return Ok(WorkloadEnd::Stopped),
                Some(Some(end)) => return Ok(end),
                Some(None) => {}
            }
        }
    }

    /// `None`: no such workload; `Some(None)`: it has not ended.
    async fn ended(&self, name: &str) -> Option<Option<WorkloadEnd>> {
        let workloads = self.inner.workloads.lock().await;
        if let Some(parked) = workloads.stopped.get(name) {
            return Some(Some(match parked.status.state {
                WorkloadState::Failed => {
                    WorkloadEnd::Failed(parked.status.last_error.clone().unwrap_or_default())
                }
                _ => WorkloadEnd::Stopped,
            }));
        }
        let running = workloads.running.get(name)?;
        let status = running.workload.status();
        let code = status.exit.as_ref().and_then(|e| e.code);
        Some(match status.state {
            WorkloadState::Completed => Some(WorkloadEnd::Exited(code.unwrap_or(0))),
            WorkloadState::Failed => Some(match code {
                Some(code) => WorkloadEnd::Exited(code),
                None => WorkloadEnd::Failed(status.last_error.unwrap_or_default()),
            }),
            WorkloadState::Stopped => Some(WorkloadEnd::Stopped),
            _ if running.workload.is_finished() => Some(WorkloadEnd::Stopped),
            _ => None,
        })
    }

    /// Every status change of every Wasm workload, as it is recorded.
    pub fn status_changes(&self) -> broadcast::Receiver<StatusChange> {
        self.store().status_changes()
    }

    /// Every telemetry record, after the event that published it committed. A receiver that
    /// lags loses the oldest records.
    pub fn telemetry_tap(&self) -> broadcast::Receiver<CommittedTelemetry> {
        self.store().telemetry_tap()
    }
}
