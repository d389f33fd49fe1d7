//! One live device-function instance: its store, its bindings and its host state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lichen_host_apis::{
    DeviceFunction, DeviceFunctionPre, DeviceState, Event, HostLimits, KvMap, LogSink,
    PendingWrites,
};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::engine::EPOCH_TICK;
use super::limiter::MemoryLimiter;

/// Store data of a component instance.
pub struct InstanceData {
    pub(crate) device: DeviceState,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    ticks_in_call: u64,
    slice_ticks: u64,
}

impl WasiView for InstanceData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What an instance is made from.
#[derive(Clone)]
pub struct InstanceSetup {
    /// The workload's name.
    pub workload: Arc<str>,
    /// The workload's configuration.
    pub config: Arc<BTreeMap<String, String>>,
    /// The workload's committed key-value data, shared with its other instances.
    pub kv: Arc<Mutex<KvMap>>,
    /// Where guest log lines go.
    pub log: Arc<dyn LogSink>,
    /// Most linear memory the instance may use, in bytes.
    pub memory_limit: usize,
    /// Longest wall time one call into the guest may take.
    pub time_slice: Duration,
    /// The devices the workload was granted (empty: none).
    pub devices: Arc<lichen_host_apis::DeviceGrants>,
}

/// How a call into the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The guest returned `ok`, with a reply for commands.
    Ok(Option<Vec<u8>>),
    /// The guest returned an error; it is still healthy.
    GuestError(String),
    /// The guest trapped (or was preempted); the instance must be discarded.
    Trap(String),
}

/// The epoch callback's error when a call outlives its time slice.
#[derive(Debug)]
struct TimeSliceExceeded(Duration);

impl std::fmt::Display for TimeSliceExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "preempted: the call ran longer than its time slice of {:?}",
            self.0
        )
    }
}

impl std::error::Error for TimeSliceExceeded {}

/// A live instance of a device-function component.
pub struct Instance {
    store: Store<InstanceData>,
    bindings: DeviceFunction,
    config_list: Vec<(String, String)>,
    started_at: Instant,
    time_slice: Duration,
}

impl Instance {
    /// Instantiates the component (without calling `init`).
    pub async fn instantiate(
        engine: &Engine,
        pre: &DeviceFunctionPre<InstanceData>,
        setup: &InstanceSetup,
    ) -> Result<Self, String> {
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let device = DeviceState::new(
            setup.workload.clone(),
            setup.config.clone(),
            setup.kv.clone(),
            setup.log.clone(),
            HostLimits::default(),
        )
        .with_devices(setup.devices.clone());
        let slice_ticks =
            u64::try_from((setup.time_slice.as_millis() / EPOCH_TICK.as_millis()).max(1))
                .unwrap_or(u64::MAX);
        let data = InstanceData {
            device,
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(setup.memory_limit),
            ticks_in_call: 0,
            slice_ticks,
        };
        let mut store = Store::new(engine, data);
        store.limiter(|d| &mut d.limiter);
        let time_slice = setup.time_slice;
        store.epoch_deadline_callback(move |mut ctx| {
            let data = ctx.data_mut();
            data.ticks_in_call += 1;
            if data.ticks_in_call >= data.slice_ticks {
                return Err(TimeSliceExceeded(time_slice).into());
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store.data_mut().ticks_in_call = 0;
        store.set_epoch_deadline(1);
        let bindings = match pre.instantiate_async(&mut store).await {
            Ok(b) => b,
            Err(err) => return Err(describe_failure(&mut store, &err)),
        };
        let config_list = setup
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self {
            store,
            bindings,
            config_list,
            started_at: Instant::now(),
            time_slice,
        })
    }

    /// Calls the guest's `init` with its configuration.
    pub async fn init(&mut self) -> CallOutcome {
        self.arm();
        let config = std::mem::take(&mut self.config_list);
        let result = self.bindings.call_init(&mut self.store, &config).await;
        self.config_list = config;
        match result {
            Ok(Ok(())) => CallOutcome::Ok(None),
            Ok(Err(message)) => CallOutcome::GuestError(message),
            Err(err) => CallOutcome::Trap(describe_failure(&mut self.store, &err)),
        }
    }

    /// Calls the guest's `on-event`.
    pub async fn handle(&mut self, event: &Event) -> CallOutcome {
        self.arm();
        match self.bindings.call_on_event(&mut self.store, event).await {
            Ok(Ok(reply)) => CallOutcome::Ok(reply),
            Ok(Err(message)) => CallOutcome::GuestError(message),
            Err(err) => CallOutcome::Trap(describe_failure(&mut self.store, &err)),
        }
    }

    /// Whether the instance holds device grants, so that its host calls reach drivers that
    /// block (gpiochip, spidev and i2c-dev ioctls).
    pub fn has_devices(&self) -> bool {
        !self.store.data().device.devices().is_empty()
    }

    /// Calls `init` where its host calls may block: see [`Instance::run_guest`].
    pub async fn init_off_workers(self) -> (Option<Self>, CallOutcome) {
        self.run_guest(|instance| Box::pin(instance.init())).await
    }

    /// Calls `on-event` where its host calls may block: see [`Instance::run_guest`].
    pub async fn handle_off_workers(self, event: Event) -> (Option<Self>, CallOutcome) {
        self.run_guest(move |instance| Box::pin(async move { instance.handle(&event).await }))
            .await
    }

    /// Runs a call into the guest. The guest's host calls run on the thread that polls the
    /// call, and a device host call blocks in an ioctl (a GPIO line request, an SPI transfer
    /// clocked at the granted speed, an I2C transaction a target may stretch), so an
    /// instance holding device grants is never called on an async worker: on the
    /// multi-thread runtime the worker thread turns into a blocking thread for the call
    /// (`block_in_place`, its scheduler core goes on elsewhere), on a current-thread runtime
    /// the call goes to the blocking pool. An instance without grants has no blocking host
    /// call and is polled in place. The instance comes back with the outcome, or `None` if
    /// the blocking thread panicked (then the instance is lost and the outcome is a trap
    /// saying so).
    async fn run_guest<F>(mut self, call: F) -> (Option<Self>, CallOutcome)
    where
        F: for<'a> FnOnce(
                &'a mut Instance,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = CallOutcome> + Send + 'a>,
            > + Send
            + 'static,
    {
        if !self.has_devices() {
            let outcome = call(&mut self).await;
            return (Some(self), outcome);
        }
        let runtime = tokio::runtime::Handle::current();
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            // The worker thread hands its scheduler core to another thread and becomes a
            // blocking thread for the call: no wait for a pool thread to wake up.
            let outcome = tokio::task::block_in_place(|| runtime.block_on(call(&mut self)));
            return (Some(self), outcome);
        }
        let joined = tokio::task::spawn_blocking(move || {
            let outcome = runtime.block_on(call(&mut self));
            (self, outcome)
        })
        .await;
        match joined {
            Ok((instance, outcome)) => (Some(instance), outcome),
            Err(error) => (
                None,
                CallOutcome::Trap(format!("the device call thread failed: {error}")),
            ),
        }
    }

    /// Drops the instance; one holding device grants is dropped on tokio's blocking pool,
    /// since releasing its last handles drives outputs to their safe state (an ioctl).
    /// Returns once the handles are released, so the pins can be requested again.
    pub async fn release(self) {
        if self.has_devices() {
            let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        }
    }

    /// Takes the key-value writes and telemetry of the last call, to commit them.
    pub fn take_pending(&mut self) -> PendingWrites {
        self.store.data_mut().device.take_pending()
    }

    /// Drops the writes of the last call.
    pub fn discard_pending(&mut self) {
        self.store.data_mut().device.discard_pending();
    }

    /// Publishes committed writes to every instance of the workload.
    pub fn apply_committed(&self, writes: &PendingWrites) {
        self.store.data().device.apply_committed(writes);
    }

    /// The device handles the instance was granted.
    pub fn devices(&self) -> Arc<lichen_host_apis::DeviceGrants> {
        self.store.data().device.devices().clone()
    }

    /// Drives the instance's granted outputs to their safe state; returns the pins that
    /// failed, with why.
    pub fn set_safe_state(&self) -> Vec<(String, lichen_devices::Error)> {
        self.store.data().device.devices().set_safe_state()
    }

    /// Linear memory in use, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.used_bytes()
    }

    /// When the instance was created.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// The time slice of one call.
    pub fn time_slice(&self) -> Duration {
        self.time_slice
    }

    fn arm(&mut self) {
        self.store.data_mut().ticks_in_call = 0;
        self.store.set_epoch_deadline(1);
    }
}

/// Describes a trap for people: preemption and memory exhaustion are named as such.
fn describe_failure(store: &mut Store<InstanceData>, err: &wasmtime::Error) -> String {
    if let Some(slice) = err.downcast_ref::<TimeSliceExceeded>() {
        return slice.to_string();
    }
    let limiter = &mut store.data_mut().limiter;
    let trap = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<wasmtime::Trap>());
    let text = match trap {
        Some(trap) => trap
            .to_string()
            .replace("wasm trap: wasm trap: ", "wasm trap: "),
        None => first_lines(&format!("{}", err.root_cause())),
    };
    match limiter.take_refused() {
        Some(wanted) => format!(
            "memory limit of {} bytes reached (the guest asked for {} bytes), then: {text}",
            limiter.limit_bytes(),
            wanted
        ),
        None => text,
    }
}

/// Keeps an error short enough for a status line: no backtrace, at most 400 bytes.
pub(crate) fn first_lines(text: &str) -> String {
    let cut = text.split("\n\n").next().unwrap_or(text).replace('\n', " ");
    if cut.len() > 400 {
        let mut end = 400;
        while !cut.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &cut[..end])
    } else {
        cut
    }
}
