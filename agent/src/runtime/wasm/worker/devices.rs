//! A worker's device handles: opening a spec's grants, putting held lines back after a
//! reload that did not take over, and letting go of them, each off the async workers (the
//! ioctls run on tokio's blocking pool).

use std::sync::Arc;

use super::WorkerContext;
use crate::deployment::WorkloadSpec;

/// Opens the devices `spec` grants (shared with the workload's live instance, if any).
/// Opening requests lines and opens device nodes (ioctls), so it runs on tokio's blocking
/// pool, never on an async worker.
pub(super) async fn open_devices(
    ctx: &WorkerContext,
    spec: &WorkloadSpec,
) -> Result<Arc<lichen_host_apis::DeviceGrants>, String> {
    if spec.gpio.is_empty() && spec.spi.is_empty() && spec.i2c.is_empty() {
        return Ok(Arc::default());
    }
    let hub = ctx.devices.clone();
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || {
        hub.open_grants(&spec)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the device opening thread failed: {e}"))?
}

/// Puts the input lines the running version holds back to its `spec`'s settings after a
/// reload that reconfigured them did not take over (opening shares the held lines and
/// reconfigures those whose settings differ). A failure is logged: the running version keeps
/// its lines either way.
pub(super) async fn restore_devices(ctx: &WorkerContext, spec: &WorkloadSpec) {
    match open_devices(ctx, spec).await {
        Ok(devices) => release_devices(devices).await,
        Err(message) => ctx.logs.agent_line(
            &spec.name,
            lichen_host_apis::LogLevel::Warn,
            &format!("cannot restore the running version's pin settings: {message}"),
        ),
    }
}

/// Lets go of a reference to a workload's device handles. When it is the last one, the
/// handles close and outputs go to their safe state (ioctls), so that happens on tokio's
/// blocking pool.
pub(super) async fn release_devices(devices: Arc<lichen_host_apis::DeviceGrants>) {
    if !devices.is_empty() {
        let _ = tokio::task::spawn_blocking(move || drop(devices)).await;
    }
}
