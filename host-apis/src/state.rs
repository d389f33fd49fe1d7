//! The per-instance host state behind every import.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::component::ResourceTable;

use crate::devices::DeviceGrants;
use crate::keyvalue::{KvKey, KvMap};
use crate::logging::LogSink;

/// Limits on what one workload may store and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Largest key, in bytes.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most keys a workload may hold across its buckets.
    pub max_keys: usize,
    /// Largest telemetry payload, in bytes.
    pub max_telemetry_bytes: usize,
    /// Most telemetry records one call into the guest may publish.
    pub max_records_per_call: usize,
}

impl Default for HostLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 256,
            max_value_bytes: 64 * 1024,
            max_keys: 10_000,
            max_telemetry_bytes: 64 * 1024,
            max_records_per_call: 1_000,
        }
    }
}

/// A telemetry record published by a guest, not yet committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryRecord {
    /// Stream name, validated.
    pub stream: String,
    /// The payload as the guest gave it.
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch when the guest published it.
    pub created_at_ms: u64,
}

/// Writes a guest made during one call, to be committed together or not at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingWrites {
    /// Key-value writes, last write per key wins; `None` deletes the key.
    pub kv: BTreeMap<KvKey, Option<Vec<u8>>>,
    /// Telemetry records in the order they were published.
    pub telemetry: Vec<TelemetryRecord>,
}

impl PendingWrites {
    /// Tells whether the call wrote nothing.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty() && self.telemetry.is_empty()
    }
}

/// Host state of one device-function instance.
pub struct DeviceState {
    pub(crate) workload: Arc<str>,
    pub(crate) config: Arc<BTreeMap<String, String>>,
    pub(crate) committed: Arc<Mutex<KvMap>>,
    pub(crate) pending: PendingWrites,
    pub(crate) log: Arc<dyn LogSink>,
    pub(crate) table: ResourceTable,
    pub(crate) limits: HostLimits,
    pub(crate) devices: Arc<DeviceGrants>,
    /// Devices the guest holds open, as `gpio:<name>`, `spi:<name>`, `i2c:<name>`.
    pub(crate) open_devices: BTreeSet<String>,
}

impl DeviceState {
    /// State for an instance of `workload`. `committed` is the workload's durable key-value
    /// data as last committed; instances of the same workload (old and new during a hot
    /// reload) share it.
    pub fn new(
        workload: Arc<str>,
        config: Arc<BTreeMap<String, String>>,
        committed: Arc<Mutex<KvMap>>,
        log: Arc<dyn LogSink>,
        limits: HostLimits,
    ) -> Self {
        Self {
            workload,
            config,
            committed,
            pending: PendingWrites::default(),
            log,
            table: ResourceTable::new(),
            limits,
            devices: Arc::new(DeviceGrants::new()),
            open_devices: BTreeSet::new(),
        }
    }

    /// Gives the instance the device handles its workload was granted; without this call the
    /// instance may use no device.
    pub fn with_devices(mut self, devices: Arc<DeviceGrants>) -> Self {
        self.devices = devices;
        self
    }

    /// The device handles this instance may use.
    pub fn devices(&self) -> &Arc<DeviceGrants> {
        &self.devices
    }

    /// The workload this instance belongs to.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// Takes the writes of the last call; the caller commits them and then calls
    /// [`DeviceState::apply_committed`].
    pub fn take_pending(&mut self) -> PendingWrites {
        std::mem::take(&mut self.pending)
    }

    /// Drops the writes of a call that trapped or failed.
    pub fn discard_pending(&mut self) {
        self.pending = PendingWrites::default();
    }

    /// Makes committed key-value writes visible to every instance of the workload.
    pub fn apply_committed(&self, writes: &PendingWrites) {
        let mut map = lock(&self.committed);
        for (key, value) in &writes.kv {
            match value {
                Some(v) => {
                    map.insert(key.clone(), v.clone());
                }
                None => {
                    map.remove(key);
                }
            }
        }
    }
}

/// Locks the committed map; a poisoned lock only means another thread panicked while
/// holding it, and the map itself is always left consistent (single inserts/removes).
pub(crate) fn lock(map: &Mutex<KvMap>) -> std::sync::MutexGuard<'_, KvMap> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
