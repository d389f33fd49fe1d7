//! The mapper's core: the models and devices EdgeCore gave it, one task per device driving its
//! [`DeviceTwin`], the routing of telemetry and health to those tasks, and the reports they
//! queue. The gRPC server ([`crate::server`]) and the uplink's registration
//! ([`crate::uplink`]) call into [`Mapper`]; a refused request changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::DmiError;
use crate::host::{DeviceHost, Health, HostError};
use crate::plan::{DevicePlan, Function, Model, ResourceId, plan_device, plan_model};
use crate::proto::v1beta1 as pb;
use crate::queue::{Report, ReportQueue};
use crate::twin::DeviceTwin;
use crate::workload::{CONFIG_DATA, device_field};

/// Settings of the mapper (the agent config's `[kubeedge]` section).
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// EdgeCore's DMI socket (`DeviceManagerService`); default `/etc/kubeedge/dmi.sock`.
    pub edgecore_socket: std::path::PathBuf,
    /// Lichen's socket (`DeviceMapperService`), sent to EdgeCore at registration; default
    /// `/etc/kubeedge/lichen.sock`.
    pub mapper_socket: std::path::PathBuf,
    /// Mapper name sent at registration.
    pub name: String,
    /// Most devices (each a live function); more are refused.
    pub max_devices: usize,
    /// Most device models.
    pub max_models: usize,
    /// How often workload health is read.
    pub health_every: Duration,
    /// Longest wait for one call to EdgeCore.
    pub call_timeout: Duration,
    /// First wait after EdgeCore could not be reached; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest wait between tries.
    pub backoff_max: Duration,
    /// How often, when idle, the uplink checks whether EdgeCore's socket was recreated.
    pub probe_every: Duration,
}

impl Default for MapperConfig {
    fn default() -> Self {
        Self {
            edgecore_socket: "/etc/kubeedge/dmi.sock".into(),
            mapper_socket: "/etc/kubeedge/lichen.sock".into(),
            name: crate::plan::PROTOCOL.to_owned(),
            max_devices: 4096,
            max_models: 1024,
            health_every: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            probe_every: Duration::from_secs(1),
        }
    }
}

/// Counters, for tests, `doctor` and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful `MapperRegister` calls.
    pub registrations: AtomicU64,
    /// Reports EdgeCore took.
    pub reports_sent: AtomicU64,
    /// Reports EdgeCore refused for good (dropped).
    pub reports_refused: AtomicU64,
    /// Reports that could not be queued (the queue failed).
    pub queue_errors: AtomicU64,
}

/// A message to a device's task.
enum DeviceMsg {
    Update(Box<DevicePlan>),
    Telemetry { stream: String, payload: Vec<u8> },
    Health(Option<Health>),
}

/// Capacity of a device task's inbox; telemetry beyond it is dropped (latest value wins).
const INBOX: usize = 64;

struct Entry {
    /// [`Registry::seq`] when EdgeCore last registered or updated it.
    seq: u64,
    device: pb::Device,
    plan: DevicePlan,
    tx: mpsc::Sender<DeviceMsg>,
    status: watch::Receiver<pb::DeviceStatus>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Registry {
    /// Counts device registrations and updates.
    seq: u64,
    models: BTreeMap<ResourceId, (pb::DeviceModel, Model)>,
    devices: BTreeMap<ResourceId, Entry>,
}

type Routes = HashMap<String, Vec<(ResourceId, mpsc::Sender<DeviceMsg>)>>;

pub(crate) struct Inner<H, Q> {
    pub(crate) host: H,
    pub(crate) queue: Arc<Q>,
    pub(crate) config: MapperConfig,
    registry: Mutex<Registry>,
    routes: RwLock<Routes>,
    pub(crate) queued: Notify,
    pub(crate) stats: Stats,
}

/// The mapper; cheap to clone.
pub struct Mapper<H, Q> {
    pub(crate) inner: Arc<Inner<H, Q>>,
}

impl<H, Q> Clone for Mapper<H, Q> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn host_error(e: HostError) -> DmiError {
    match e {
        HostError::Invalid { field, message } => DmiError::Invalid {
            field: device_field(&field),
            message,
        },
        HostError::NotFound(m) => DmiError::not_found(format!("{CONFIG_DATA}.module"), m),
        HostError::Unavailable(m) => DmiError::Unavailable(m),
        HostError::Refused(m) | HostError::Internal(m) => DmiError::Internal(m),
    }
}

impl<H: DeviceHost, Q: ReportQueue> Mapper<H, Q> {
    /// A mapper over `host` queueing into `queue`; [`crate::run`] starts its tasks.
    pub fn new(host: H, queue: Arc<Q>, config: MapperConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                host,
                queue,
                config,
                registry: Mutex::new(Registry::default()),
                routes: RwLock::new(HashMap::new()),
                queued: Notify::new(),
                stats: Stats::default(),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The settings.
    pub fn config(&self) -> &MapperConfig {
        &self.inner.config
    }

    /// The host.
    pub fn host(&self) -> &H {
        &self.inner.host
    }

    /// Devices held, by `namespace/name`, with the workload each talks to.
    pub async fn devices(&self) -> Vec<(ResourceId, String)> {
        let reg = self.inner.registry.lock().await;
        reg.devices
            .iter()
            .map(|(id, e)| (id.clone(), e.plan.function.workload().to_owned()))
            .collect()
    }

    /// Stops every device's task and forgets the devices, leaving their workloads to the
    /// agent (the mapper is shutting down; the next start learns the devices from EdgeCore).
    pub async fn stop_devices(&self) {
        let mut reg = self.inner.registry.lock().await;
        for (id, entry) in std::mem::take(&mut reg.devices) {
            entry.task.abort();
            self.route(&id, entry.plan.function.workload(), None);
        }
    }

    /// `CreateDeviceModel` (and `UpdateDeviceModel` of a known model).
    pub async fn create_model(&self, model: pb::DeviceModel) -> Result<ResourceId, DmiError> {
        let checked = plan_model(&model)?;
        let mut reg = self.inner.registry.lock().await;
        if !reg.models.contains_key(&checked.id) && reg.models.len() >= self.inner.config.max_models
        {
            return Err(DmiError::invalid(
                "model.name",
                format!(
                    "this mapper already holds {} models, the most it takes",
                    reg.models.len()
                ),
            ));
        }
        let id = checked.id.clone();
        reg.models.insert(id.clone(), (model, checked));
        Ok(id)
    }

    /// `UpdateDeviceModel`: the model must exist. Devices keep their plan until they are
    /// updated.
    pub async fn update_model(&self, model: pb::DeviceModel) -> Result<(), DmiError> {
        let id = ResourceId::new(&model.namespace, &model.name);
        if !self.inner.registry.lock().await.models.contains_key(&id) {
            return Err(DmiError::not_found(
                "model.name",
                format!("DeviceModel {id} is not known to this mapper"),
            ));
        }
        self.create_model(model).await.map(drop)
    }

    /// `RemoveDeviceModel` (removing an unknown model is not an error).
    pub async fn remove_model(&self, id: &ResourceId) {
        self.inner.registry.lock().await.models.remove(id);
    }

    /// `RegisterDevice`: plans the device, applies its workload through the host (or checks
    /// the workload it attaches to exists), then starts its twin. A known device is updated.
    pub async fn register_device(&self, device: pb::Device) -> Result<ResourceId, DmiError> {
        self.upsert(device).await
    }

    /// `UpdateDevice`: plans the new spec; a changed own workload is applied (hot reload) and
    /// a changed function replaces the old one; the twin keeps its reported values. An unknown
    /// device is registered.
    pub async fn update_device(&self, device: pb::Device) -> Result<(), DmiError> {
        self.upsert(device).await.map(drop)
    }

    async fn upsert(&self, device: pb::Device) -> Result<ResourceId, DmiError> {
        let mut reg = self.inner.registry.lock().await;
        let id = ResourceId::new(&device.namespace, &device.name);
        let old = reg.devices.get(&id).map(|e| e.plan.function.clone());
        if old.is_none() && reg.devices.len() >= self.inner.config.max_devices {
            return Err(DmiError::invalid(
                "metadata.name",
                format!(
                    "this node already runs {} devices, the most it takes (max-devices)",
                    reg.devices.len()
                ),
            ));
        }
        let plan = plan_device(&device, |m| reg.models.get(m).map(|(_, m)| m.clone()))?;
        self.check_function(&reg, &plan).await?;
        if old.as_ref() != Some(&plan.function)
            && let Function::Own(w) = &plan.function
        {
            self.inner
                .host
                .apply((**w).clone())
                .await
                .map_err(host_error)?;
        }
        reg.seq += 1;
        let seq = reg.seq;
        let Some(old) = old else {
            let mut entry = self.start_device(device, plan);
            entry.seq = seq;
            reg.devices.insert(id.clone(), entry);
            tracing::info!(device = %id, "KubeEdge device registered");
            return Ok(id);
        };
        if let Function::Own(w) = &old
            && plan.function.workload() != w.name
            && let Err(e) = self.inner.host.remove(&w.name).await
        {
            tracing::warn!(device = %id, workload = %w.name, "cannot remove the replaced workload: {e}");
        }
        let entry = reg
            .devices
            .get_mut(&id)
            .expect("checked above under the lock");
        if old.workload() != plan.function.workload() {
            self.route(&id, old.workload(), None);
            self.route(&id, plan.function.workload(), Some(entry.tx.clone()));
        }
        // The task gets the plan before the next device operation can run (the registry
        // lock is held); a full inbox waits.
        let _ = entry
            .tx
            .send(DeviceMsg::Update(Box::new(plan.clone())))
            .await;
        entry.plan = plan;
        entry.device = device;
        entry.seq = seq;
        Ok(id)
    }

    /// Refuses an own workload whose name another device uses, and an attached workload that
    /// does not exist.
    async fn check_function(&self, reg: &Registry, plan: &DevicePlan) -> Result<(), DmiError> {
        match &plan.function {
            Function::Own(w) => {
                if let Some((other, _)) = reg.devices.iter().find(|(id, e)| {
                    **id != plan.id
                        && matches!(&e.plan.function, Function::Own(o) if o.name == w.name)
                }) {
                    return Err(DmiError::Conflict {
                        field: "metadata.name".into(),
                        message: format!("workload {} is already Device {other}'s", w.name),
                    });
                }
            }
            Function::Attached(name) => {
                if !self.inner.host.health().await.contains_key(name) {
                    return Err(DmiError::not_found(
                        format!("{CONFIG_DATA}.workload"),
                        format!("workload {name:?} is not deployed on this node"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn start_device(&self, device: pb::Device, plan: DevicePlan) -> Entry {
        let (tx, rx) = mpsc::channel(INBOX);
        let (status_tx, status) = watch::channel(pb::DeviceStatus::default());
        let task = tokio::spawn(run_device(self.inner.clone(), plan.clone(), rx, status_tx));
        self.route(&plan.id, plan.function.workload(), Some(tx.clone()));
        Entry {
            seq: 0,
            device,
            plan,
            tx,
            status,
            task,
        }
    }

    /// Adds (`Some`) or removes (`None`) the route of a device's telemetry and health.
    fn route(&self, id: &ResourceId, workload: &str, tx: Option<mpsc::Sender<DeviceMsg>>) {
        let mut routes = self
            .inner
            .routes
            .write()
            .expect("routes lock is never poisoned");
        let list = routes.entry(workload.to_owned()).or_default();
        list.retain(|(d, _)| d != id);
        if let Some(tx) = tx {
            list.push((id.clone(), tx));
        }
        if list.is_empty() {
            routes.remove(workload);
        }
    }

    /// `RemoveDevice`: stops the twin and removes the device's own workload (its outputs go to
    /// their safe state); a device attached to a deployed workload leaves it running.
    pub async fn remove_device(&self, id: &ResourceId) -> Result<(), DmiError> {
        let mut reg = self.inner.registry.lock().await;
        let Some(entry) = reg.devices.get(id) else {
            return Err(DmiError::not_found(
                "deviceName",
                format!("Device {id} is not known to this mapper"),
            ));
        };
        if let Function::Own(w) = &entry.plan.function {
            match self.inner.host.remove(&w.name).await {
                Ok(()) | Err(HostError::NotFound(_)) => {}
                Err(e) => return Err(host_error(e)),
            }
        }
        let entry = reg
            .devices
            .remove(id)
            .expect("checked above under the lock");
        self.route(id, entry.plan.function.workload(), None);
        entry.task.abort();
        tracing::info!(device = %id, "KubeEdge device removed");
        Ok(())
    }

    /// `GetDevice`: the device as registered, with its twins' observed desired and reported
    /// values.
    pub async fn get_device(&self, id: &ResourceId) -> Result<pb::Device, DmiError> {
        let reg = self.inner.registry.lock().await;
        let entry = reg.devices.get(id).ok_or_else(|| {
            DmiError::not_found(
                "deviceName",
                format!("Device {id} is not known to this mapper"),
            )
        })?;
        let mut device = entry.device.clone();
        device.status = Some(entry.status.borrow().clone());
        Ok(device)
    }

    /// The device sequence now: pass it to [`Mapper::reconcile`] for a device list read
    /// after this moment.
    pub async fn epoch(&self) -> u64 {
        self.inner.registry.lock().await.seq
    }

    /// Takes the lists a `MapperRegister` call returned, the call having started at `epoch`
    /// ([`Mapper::epoch`]): creates or updates every model and device listed, and removes the
    /// devices EdgeCore does not list. A device EdgeCore registered or updated over DMI since
    /// `epoch` is newer than the list and left alone. A device refused here is logged and
    /// skipped.
    pub async fn reconcile(
        &self,
        models: Vec<pb::DeviceModel>,
        devices: Vec<pb::Device>,
        epoch: u64,
    ) {
        for model in models {
            let name = format!("{}/{}", model.namespace, model.name);
            if let Err(e) = self.create_model(model).await {
                tracing::warn!(model = %name, "EdgeCore's DeviceModel refused: {e}");
            }
        }
        let newer =
            |reg: &Registry, id: &ResourceId| reg.devices.get(id).is_some_and(|e| e.seq > epoch);
        let listed: Vec<ResourceId> = devices
            .iter()
            .map(|d| ResourceId::new(&d.namespace, &d.name))
            .collect();
        for device in devices {
            let id = ResourceId::new(&device.namespace, &device.name);
            let protocol = device
                .spec
                .as_ref()
                .and_then(|s| s.protocol.as_ref())
                .map(|p| p.protocol_name.as_str());
            if protocol != Some(crate::plan::PROTOCOL)
                || newer(&*self.inner.registry.lock().await, &id)
            {
                continue;
            }
            if let Err(e) = self.register_device(device).await {
                tracing::warn!(device = %id, "EdgeCore's Device refused: {e}");
            }
        }
        let stale: Vec<ResourceId> = {
            let reg = self.inner.registry.lock().await;
            reg.devices
                .keys()
                .filter(|id| !listed.contains(id) && !newer(&reg, id))
                .cloned()
                .collect()
        };
        for id in stale {
            if let Err(e) = self.remove_device(&id).await {
                tracing::warn!(device = %id, "cannot remove a device EdgeCore no longer lists: {e}");
            }
        }
    }

    /// Forwards telemetry records to the tasks of the devices of their workload, until the
    /// host's channel closes.
    pub(crate) async fn route_telemetry(self) {
        let mut rx = self.inner.host.telemetry();
        loop {
            match rx.recv().await {
                Ok(t) => {
                    let routes = self
                        .inner
                        .routes
                        .read()
                        .expect("routes lock is never poisoned");
                    for (_, tx) in routes.get(&t.workload).into_iter().flatten() {
                        let _ = tx.try_send(DeviceMsg::Telemetry {
                            stream: t.stream.clone(),
                            payload: t.payload.clone(),
                        });
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(
                        records = n,
                        "mapper lagged behind telemetry; latest values still arrive"
                    );
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Reads workload health every `health_every` and hands it to the device tasks.
    pub(crate) async fn watch_health(self) {
        let mut every = tokio::time::interval(self.inner.config.health_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let health = self.inner.host.health().await;
            let routes: Vec<(String, Vec<mpsc::Sender<DeviceMsg>>)> = {
                let routes = self
                    .inner
                    .routes
                    .read()
                    .expect("routes lock is never poisoned");
                routes
                    .iter()
                    .map(|(w, list)| (w.clone(), list.iter().map(|(_, tx)| tx.clone()).collect()))
                    .collect()
            };
            for (workload, txs) in routes {
                for tx in txs {
                    let _ = tx.try_send(DeviceMsg::Health(health.get(&workload).cloned()));
                }
            }
        }
    }
}

impl<H: DeviceHost, Q: ReportQueue> Inner<H, Q> {
    /// Queues a report durably and wakes the uplink.
    async fn push(self: &Arc<Self>, report: Report) {
        let queue = self.queue.clone();
        match tokio::task::spawn_blocking(move || queue.push(&report)).await {
            Ok(Ok(_)) => self.queued.notify_one(),
            Ok(Err(e)) => {
                self.stats.queue_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("cannot queue a KubeEdge report: {e}");
            }
            Err(e) => tracing::warn!("report queue task failed: {e}"),
        }
    }
}

/// One device's task: delivers desired values, polls get commands, queues reports when due,
/// and takes plan updates, telemetry and health from its inbox. Ends when the inbox closes.
async fn run_device<H: DeviceHost, Q: ReportQueue>(
    inner: Arc<Inner<H, Q>>,
    plan: DevicePlan,
    mut rx: mpsc::Receiver<DeviceMsg>,
    status: watch::Sender<pb::DeviceStatus>,
) {
    let mut twin = DeviceTwin::new(&plan, Instant::now());
    let mut workload = plan.function.workload().to_owned();
    loop {
        let now = Instant::now();
        let commands: Vec<_> = twin
            .pending_desired(now)
            .into_iter()
            .chain(twin.due_collects(now))
            .collect();
        for cmd in commands {
            match inner
                .host
                .send(&workload, &cmd.name, cmd.payload.clone())
                .await
            {
                Ok(reply) => twin.on_reply(&cmd, reply.as_deref()),
                Err(e) => {
                    tracing::debug!(device = %twin.id(), command = %cmd.name, "command failed: {e}");
                    twin.on_failure(&cmd, e.to_string(), Instant::now());
                }
            }
        }
        if let Some(report) = twin.due_report(Instant::now()) {
            inner.push(report).await;
        }
        status.send_replace(twin.status());
        let deadline = twin.next_deadline(Instant::now());
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(DeviceMsg::Update(plan)) => {
                    workload = plan.function.workload().to_owned();
                    twin.update(&plan, Instant::now());
                }
                Some(DeviceMsg::Telemetry { stream, payload }) => twin.on_telemetry(&stream, &payload),
                Some(DeviceMsg::Health(health)) => {
                    if let Some(report) = twin.on_health(health.as_ref()) {
                        inner.push(report).await;
                    }
                }
            },
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}
