//! A FAKE agent implementing `DeviceHost` for the mapper's tests, until the agent's
//! restructured supervisor implements it. It checks grants the way the agent's deployment path
//! does (pins against the real `sim` board profile of `lichen-devices`, one owner per pin,
//! artifacts by digest, no name shared with the operator's workloads) and answers commands as a
//! simple device function would: `set-<p>` stores the payload as `<p>` and replies it, `<p>`
//! replies the stored value.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use lichen_devices::board::BoardProfile;
use lichen_kubeedge::host::{DeviceHost, Health, HostError, Telemetry};
use lichen_kubeedge::workload::{DeviceWorkload, GpioMode, Level};
use tokio::sync::{broadcast, watch};

/// One workload of the fake agent.
#[derive(Debug, Clone)]
pub struct FakeWorkload {
    /// `Some` for a workload the mapper added, `None` for the operator's.
    pub spec: Option<DeviceWorkload>,
    /// Board pins it holds.
    pub pins: Vec<String>,
    /// Its health.
    pub health: Health,
    /// The function's stored values.
    pub values: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct FakeState {
    pub workloads: BTreeMap<String, FakeWorkload>,
    /// Levels of the board's output pins as the fake drove them (the safe state after stop).
    pub outputs: BTreeMap<String, Level>,
    /// Digests in the fake artifact store.
    pub artifacts: Vec<String>,
    /// Commands delivered, in order: (workload, command, payload).
    pub commands: Vec<(String, String, String)>,
    /// Calls of `apply`, including refused ones.
    pub applies: u64,
}

#[derive(Clone)]
pub struct FakeAgent {
    board: Arc<BoardProfile>,
    pub state: Arc<Mutex<FakeState>>,
    telemetry: broadcast::Sender<Telemetry>,
    /// Moves at the end of every call (the mapper reads health every `health_every`) and on
    /// every change of a [`WatchedQueue`](super::queue::WatchedQueue) opened with it: what the
    /// tests wait on, with a deadline.
    changes: Arc<watch::Sender<u64>>,
}

/// Moves the change counter when dropped: declared first in a call, it drops last, after the
/// call's lock is released and its change is made.
struct Changed<'a>(&'a watch::Sender<u64>);

impl Drop for Changed<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

impl FakeAgent {
    /// A fake agent on the simulated board, with `artifacts` in its store.
    pub fn new(artifacts: &[&str]) -> Self {
        Self {
            board: Arc::new(BoardProfile::builtin("sim").expect("the sim board profile loads")),
            state: Arc::new(Mutex::new(FakeState {
                artifacts: artifacts.iter().map(|a| (*a).to_owned()).collect(),
                ..FakeState::default()
            })),
            telemetry: broadcast::channel(4096).0,
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// A receiver that sees every later call and queue change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The change counter, for a queue to move too.
    pub fn change_counter(&self) -> Arc<watch::Sender<u64>> {
        self.changes.clone()
    }

    fn call(&self) -> Changed<'_> {
        Changed(&self.changes)
    }

    /// Adds a workload of the operator's deployment holding `pins`.
    pub fn operator_workload(&self, name: &str, pins: &[&str]) {
        let _call = self.call();
        self.state.lock().unwrap().workloads.insert(
            name.to_owned(),
            FakeWorkload {
                spec: None,
                pins: pins.iter().map(|p| (*p).to_owned()).collect(),
                health: Health::Running,
                values: BTreeMap::new(),
            },
        );
    }

    /// The function of `workload` publishes a telemetry record.
    pub fn publish(&self, workload: &str, stream: &str, payload: &str) {
        let _call = self.call();
        let _ = self.telemetry.send(Telemetry {
            workload: workload.to_owned(),
            stream: stream.to_owned(),
            payload: payload.as_bytes().to_vec(),
        });
    }

    /// Sets a workload's health.
    pub fn set_health(&self, workload: &str, health: Health) {
        let _call = self.call();
        if let Some(w) = self.state.lock().unwrap().workloads.get_mut(workload) {
            w.health = health;
        }
    }

    /// Names of the workloads.
    pub fn workloads(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .workloads
            .keys()
            .cloned()
            .collect()
    }

    fn check(&self, s: &FakeState, w: &DeviceWorkload) -> Result<(), HostError> {
        let invalid = |field: String, message: String| HostError::Invalid { field, message };
        let digest = w.module.trim_start_matches("sha256:");
        if !s.artifacts.iter().any(|a| a == digest) {
            return Err(HostError::NotFound(format!(
                "module {} is not in the artifact store",
                w.module
            )));
        }
        if s.workloads.get(&w.name).is_some_and(|o| o.spec.is_none()) {
            return Err(invalid(
                "name".into(),
                format!("workload {:?} belongs to the operator's deployment", w.name),
            ));
        }
        for (i, g) in w.gpio.iter().enumerate() {
            if self.board.pin(&g.pin).is_none() {
                return Err(invalid(
                    format!("gpio[{i}].pin"),
                    format!("pin {:?} is not on board {:?}", g.pin, self.board.name),
                ));
            }
            if let Some((owner, _)) = s
                .workloads
                .iter()
                .find(|(name, o)| **name != w.name && o.pins.contains(&g.pin))
            {
                return Err(invalid(
                    format!("gpio[{i}].pin"),
                    format!(
                        "pin {:?} is already granted to workload {owner:?}; a GPIO line has one user",
                        g.pin
                    ),
                ));
            }
        }
        for (i, g) in w.spi.iter().enumerate() {
            if self.board.spi_bus(&g.bus).is_none() {
                return Err(invalid(
                    format!("spi[{i}].bus"),
                    format!(
                        "SPI device {:?} is not on board {:?}",
                        g.bus, self.board.name
                    ),
                ));
            }
        }
        for (i, g) in w.i2c.iter().enumerate() {
            if self.board.i2c_bus(&g.bus).is_none() {
                return Err(invalid(
                    format!("i2c[{i}].bus"),
                    format!("I2C bus {:?} is not on board {:?}", g.bus, self.board.name),
                ));
            }
        }
        Ok(())
    }
}

impl DeviceHost for FakeAgent {
    async fn apply(&self, workload: DeviceWorkload) -> Result<(), HostError> {
        let _call = self.call();
        let mut s = self.state.lock().unwrap();
        s.applies += 1;
        self.check(&s, &workload)?;
        for g in workload.gpio.iter().filter(|g| g.mode == GpioMode::Output) {
            let level = g.initial.unwrap_or(Level::Low);
            s.outputs.insert(g.pin.clone(), level);
        }
        let values = s
            .workloads
            .get(&workload.name)
            .map(|w| w.values.clone())
            .unwrap_or_default();
        s.workloads.insert(
            workload.name.clone(),
            FakeWorkload {
                pins: workload.gpio.iter().map(|g| g.pin.clone()).collect(),
                spec: Some(workload),
                health: Health::Running,
                values,
            },
        );
        Ok(())
    }

    async fn remove(&self, workload: &str) -> Result<(), HostError> {
        let _call = self.call();
        let mut s = self.state.lock().unwrap();
        match s.workloads.get(workload) {
            None => return Err(HostError::NotFound(format!("no workload {workload:?}"))),
            Some(w) if w.spec.is_none() => {
                return Err(HostError::Invalid {
                    field: "name".into(),
                    message: format!("workload {workload:?} belongs to the operator's deployment"),
                });
            }
            Some(_) => {}
        }
        let w = s.workloads.remove(workload).expect("checked above");
        // Stopped: every output back to its safe state.
        for g in w
            .spec
            .iter()
            .flat_map(|s| s.gpio.iter())
            .filter(|g| g.mode == GpioMode::Output)
        {
            let level = g.initial.unwrap_or(Level::Low);
            s.outputs.insert(g.pin.clone(), level);
        }
        Ok(())
    }

    async fn send(
        &self,
        workload: &str,
        command: &str,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, HostError> {
        let _call = self.call();
        let mut s = self.state.lock().unwrap();
        let payload = String::from_utf8_lossy(&payload).into_owned();
        s.commands
            .push((workload.to_owned(), command.to_owned(), payload.clone()));
        let w = s
            .workloads
            .get_mut(workload)
            .ok_or_else(|| HostError::NotFound(format!("no workload {workload:?}")))?;
        if w.health != Health::Running {
            return Err(HostError::Unavailable(format!(
                "workload {workload:?} is not running"
            )));
        }
        if let Some(property) = command.strip_prefix("set-") {
            w.values.insert(property.to_owned(), payload.clone());
            return Ok(Some(payload.into_bytes()));
        }
        match w.values.get(command) {
            Some(v) => Ok(Some(v.clone().into_bytes())),
            None => Err(HostError::Refused(format!("unknown command {command:?}"))),
        }
    }

    async fn health(&self) -> BTreeMap<String, Health> {
        let _call = self.call();
        let s = self.state.lock().unwrap();
        s.workloads
            .iter()
            .map(|(name, w)| (name.clone(), w.health.clone()))
            .collect()
    }

    fn telemetry(&self) -> broadcast::Receiver<Telemetry> {
        self.telemetry.subscribe()
    }
}
