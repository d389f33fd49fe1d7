//! Applying an operator deployment: validate against the other sources, prepare every
//! artifact (without holding the workloads), commit, then carry out the reconcile plan.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;

use super::plan::{self, Action, Current, Desired, Scope};
use super::{Agent, Labels, Running, Source, Workloads, sources};
use crate::api::types::{ApiError, DeployReport, WorkloadFailure};
use crate::deployment::{self, ParsedDeployment, WorkloadSpec};
use crate::runtime::{Prepared, StartInfo, Tier};
use crate::store::{NewDeployment, NewWorkload};

/// The running workloads as the reconcile plan for `source` sees them (their states only
/// where the plan's rules read them: not for the operator).
pub(super) fn current_view(workloads: &Workloads, source: Source) -> BTreeMap<String, Current<'_>> {
    workloads
        .running
        .iter()
        .map(|(name, running)| {
            (
                name.clone(),
                Current {
                    source: running.source,
                    tier: running.tier,
                    spec: running.workload.spec(),
                    digest: running.workload.digest(),
                    finished: running.workload.is_finished(),
                    state: (source != Source::Operator).then(|| running.workload.status().state),
                },
            )
        })
        .collect()
}

impl Agent {
    /// Validates a deployment file and applies it atomically. Whether it is applied or
    /// refused, the artifacts no workload of the applied deployment uses are removed afterwards,
    /// so refused deploys leave nothing behind.
    pub async fn deploy_text(
        &self,
        file_name: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<DeployReport, ApiError> {
        // One deploy at a time; validation (reading and compiling artifacts) happens before
        // anything changes, without holding the workloads (`ps` keeps answering).
        let _deploying = self.inner.deploying.lock().await;
        let result = self.deploy_locked(file_name, text, base_dir).await;
        self.collect_garbage().await;
        result
    }

    async fn deploy_locked(
        &self,
        file_name: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<DeployReport, ApiError> {
        let parsed = deployment::parse(file_name, text, base_dir)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        crate::grants::check(&parsed, self.inner.ctx.devices.profile())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        // The other sources' workloads stay: the deployment must fit beside them.
        let others: Vec<sources::Member> = self
            .union()
            .await?
            .into_iter()
            .filter(|m| m.source != Source::Operator.as_str())
            .collect();
        for (index, spec) in parsed.spec.workloads.iter().enumerate() {
            if let Some(owner) = others.iter().find(|m| m.spec.name == spec.name) {
                return Err(ApiError::invalid(
                    parsed
                        .error_at(
                            index,
                            "name",
                            format!(
                                "workload {:?} belongs to source {}; names are unique across sources",
                                spec.name, owner.source
                            ),
                        )
                        .to_string(),
                ));
            }
            if let Some((field, message)) = crate::grants::owned_elsewhere(
                spec,
                others.iter().map(|m| (m.source.as_str(), &m.spec)),
            ) {
                return Err(ApiError::invalid(
                    parsed.error_at(index, &field, message).to_string(),
                ));
            }
        }
        let other_wasm = others
            .iter()
            .filter(|m| m.spec.kind() == deployment::Tier::Wasm)
            .count();
        self.check_pool(&parsed, other_wasm, 0)?;
        let artifacts = self.prepare_all(&parsed).await?;
        let mut workloads = self.inner.workloads.lock().await;
        let desired: Vec<Desired<'_>> = parsed
            .spec
            .workloads
            .iter()
            .zip(&artifacts)
            .map(|(spec, (tier, artifact))| Desired {
                spec,
                tier: *tier,
                digest: artifact.digest(),
            })
            .collect();
        let plan = plan::plan(
            Source::Operator,
            Scope::Whole,
            &desired,
            &current_view(&workloads, Source::Operator),
        );
        self.check_pool(&parsed, other_wasm, plan.wasm_reloads(&desired))?;
        drop(desired);

        let mut new_workloads = Vec::with_capacity(parsed.spec.workloads.len());
        for (spec, (_, artifact)) in parsed.spec.workloads.iter().zip(&artifacts) {
            new_workloads.push(NewWorkload {
                name: spec.name.clone(),
                spec_json: serde_json::to_string(spec)
                    .map_err(|e| ApiError::internal(format!("cannot encode spec: {e}")))?,
                module_digest: artifact.digest().to_string(),
            });
        }
        let version = self
            .store()
            .apply_deployment(NewDeployment {
                source_name: file_name.to_string(),
                source_text: text.to_string(),
                digest: crate::runtime::wasm::sha256_hex(text.as_bytes()),
                description: parsed.spec.description.clone(),
                workloads: new_workloads,
            })
            .await
            .map_err(|e| ApiError::internal(format!("cannot record the deployment: {e}")))?;

        let mut report = DeployReport {
            version,
            ..DeployReport::default()
        };
        // Stop what the deployment no longer lists.
        for name in plan.stop {
            if let Some(old) = workloads.running.remove(&name) {
                old.workload.stop().await;
            }
            self.inner.ctx.logs.remove(&name);
            report.stopped.push(name);
        }
        let listed: Vec<&str> = parsed
            .spec
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        workloads.stopped.retain(|name, parked| {
            parked.status.source != Source::Operator.as_str() || listed.contains(&name.as_str())
        });
        drop(listed);

        for ((spec, (tier, artifact)), action) in parsed
            .spec
            .workloads
            .into_iter()
            .zip(artifacts)
            .zip(plan.actions)
        {
            let name = spec.name.clone();
            workloads.stopped.remove(&name);
            match action {
                Action::Unchanged => report.unchanged.push(name),
                Action::Reload => {
                    let Some(current) = workloads.running.get_mut(&name) else {
                        continue;
                    };
                    let handle = &mut current.workload;
                    match handle.update(artifact, spec, version).await {
                        Ok(()) => report.reloaded.push(name),
                        Err(message) => {
                            self.inner
                                .ctx
                                .metrics
                                .reload_failures
                                .fetch_add(1, Ordering::Relaxed);
                            let text = format!(
                                "reload to version {version} failed: {message}; the previous version keeps running"
                            );
                            handle.note_error(text.clone());
                            self.inner.ctx.logs.agent_line(
                                &name,
                                lichen_host_apis::LogLevel::Error,
                                &text,
                            );
                            let _ = self
                                .store()
                                .log_event(Some(&name), "reload-failed", &text)
                                .await;
                            report.failures.push(WorkloadFailure {
                                workload: name,
                                message: text,
                            });
                        }
                    }
                }
                Action::Start => {
                    self.start_workload(
                        &mut workloads,
                        tier,
                        artifact,
                        spec,
                        version,
                        Source::Operator,
                        Labels::default(),
                    )
                    .await?;
                    report.started.push(name);
                }
            }
        }
        tracing::info!(
            version,
            started = ?report.started,
            reloaded = ?report.reloaded,
            stopped = ?report.stopped,
            "deployment applied"
        );
        Ok(report)
    }

    /// Starts `spec` in `tier` with its stored key-value state, in place of whatever of that
    /// name runs (which gets `stop` first). Used by operator deploys and by the other sources.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_workload(
        &self,
        workloads: &mut Workloads,
        tier: Tier,
        artifact: Prepared,
        spec: WorkloadSpec,
        version: u64,
        source: Source,
        labels: Labels,
    ) -> Result<(), ApiError> {
        let name = spec.name.clone();
        if let Some(old) = workloads.running.remove(&name) {
            old.workload.stop().await;
        }
        let kv = self
            .store()
            .reads()
            .load_kv(&name)
            .await
            .map_err(|e| ApiError::internal(format!("cannot read state of {name:?}: {e}")))?;
        let runtime = self.runtime(tier).map_err(ApiError::internal)?;
        let workload = runtime.start(
            artifact,
            spec,
            StartInfo {
                version,
                kv,
                events_handled: 0,
            },
        );
        workloads.running.insert(
            name,
            Running {
                tier,
                workload,
                source,
                labels,
            },
        );
        Ok(())
    }

    /// Refuses a deployment whose Wasm workloads, beside the `others` Wasm workloads of the
    /// other sources (pods, devices) and with `reloads` of them holding a second instance
    /// during their hot reload, do not fit the engine's instance slots (`wasm.max-instances`):
    /// beyond them, workloads would sit in back-off forever.
    fn check_pool(
        &self,
        parsed: &ParsedDeployment,
        others: usize,
        reloads: usize,
    ) -> Result<(), ApiError> {
        let wasm = parsed
            .spec
            .workloads
            .iter()
            .filter(|w| w.kind() == deployment::Tier::Wasm)
            .count();
        let slots = self.inner.ctx.engine.options().max_instances;
        let needed = wasm.saturating_add(others).saturating_add(reloads);
        if u32::try_from(needed).is_ok_and(|needed| needed <= slots) {
            return Ok(());
        }
        let mut what = format!("{wasm} Wasm workloads");
        if others > 0 {
            what.push_str(&format!(
                ", beside the {others} Wasm workloads of the pods and devices sources,"
            ));
        }
        if reloads > 0 {
            what.push_str(&format!(
                " and {reloads} hot reloads (a reloaded workload holds a second slot until its \
                 new version has handled an event)"
            ));
        }
        what.push_str(&format!(" need {needed} instance slots"));
        Err(ApiError::invalid(format!(
            "{}: workloads: {what}, but this agent's engine has {slots} \
             (`wasm.max-instances` in the agent config): raise wasm.max-instances or deploy \
             fewer Wasm workloads",
            parsed.file_name()
        )))
    }

    /// Removes the stored artifacts (compiled modules, imported images) that no workload of
    /// the applied deployment uses; each runtime sweeps its own. Called after every deploy
    /// and at start, with the deploy lock held.
    pub(super) async fn collect_garbage(&self) {
        let in_use: BTreeSet<String> = match self.store().reads().all_workloads().await {
            Ok(rows) => rows.into_iter().map(|(w, _, _)| w.module_digest).collect(),
            Err(err) => {
                tracing::warn!(
                    "not collecting unused artifacts: cannot read the deployment: {err}"
                );
                return;
            }
        };
        for runtime in self.inner.runtimes.values() {
            runtime.collect_garbage(&in_use).await;
        }
    }

    /// Picks every workload's tier and prepares its artifact (compiles a module, imports an
    /// image); the first failure rejects the whole deployment with the file, line and field of
    /// the workload that failed, before anything changes.
    async fn prepare_all(
        &self,
        parsed: &ParsedDeployment,
    ) -> Result<Vec<(Tier, Prepared)>, ApiError> {
        #[cfg(test)]
        {
            let hook = self
                .inner
                .prepare_hook
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(hook) = hook {
                hook.entered.notify_one();
                hook.release.notified().await;
            }
        }
        let mut out = Vec::with_capacity(parsed.spec.workloads.len());
        let isolation = self.isolation_for(&parsed.spec.workloads).await;
        for (index, spec) in parsed.spec.workloads.iter().enumerate() {
            let invalid = |field: &str, message: String| {
                ApiError::invalid(parsed.error_at(index, field, message).to_string())
            };
            let tier = isolation
                .select(spec)
                .map_err(|e| invalid("isolation", e.to_string()))?;
            let runtime = self
                .runtime(tier)
                .map_err(|message| invalid("isolation", message))?;
            let prepared = runtime
                .prepare(spec, None)
                .await
                .map_err(|e| invalid(&e.field, e.message))?;
            out.push((tier, prepared));
        }
        Ok(out)
    }
}
