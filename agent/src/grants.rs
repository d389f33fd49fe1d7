//! Device grants: the whole deployment checked against the board profile at deploy, and the
//! granted pins and buses opened for each workload's instances.
//!
//! [`check`] runs before anything of a deployment is applied: a pin or bus the board does not
//! have, a pin or an I2C bus address granted to two workloads (or twice to one), or an SPI
//! clock above the bus's limit rejects the whole deployment with the file, line and field at
//! fault. [`owned_elsewhere`] applies the same ownership rules across sources.
//!
//! [`DeviceHub`] owns the board's devices and opens a workload's grants as [`DeviceGrants`]:
//! on the simulated board for a `sim` profile, through the Linux character devices (gpiochip,
//! spidev, i2c-dev; see the `linux` submodule) for every other profile. A device that cannot
//! be opened fails the start of the workload that asked for it, naming the node or line. Handles are shared by the instances of one workload
//! (old and new version during a hot reload), and released when the last of them goes; an
//! output is driven to its safe state (its `initial` level) when released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Context, Result};
use lichen_devices::board::{Backend, BoardProfile};
use lichen_devices::sim::SimBoard;
use lichen_devices::{InputConfig, OutputConfig, SpiConfig};
use lichen_host_apis::{
    DeviceGrants, GrantedI2c, GrantedInput, GrantedOutput, GrantedSpi, I2cBusBox, InputPinBox,
    OutputPinBox, SpiDeviceBox,
};

use crate::deployment::{DeploymentError, GpioMode, ParsedDeployment, WorkloadSpec};

/// Code the simulated MCP3008's channel 0 reads at start (about 1.65 V of 3.3 V).
pub const SIM_ADC_CHANNEL0: u16 = 512;
/// Temperature the simulated TMP102 and BME280 read at start, in °C.
pub const SIM_TEMPERATURE_C: f32 = 21.5;

/// Checks every grant of `parsed` against `board`; the first problem, in file order, rejects
/// the deployment.
pub fn check(parsed: &ParsedDeployment, board: &BoardProfile) -> Result<(), DeploymentError> {
    // Board pin -> (workload index, grant index, mode) of its first grant.
    let mut pins: HashMap<&str, (usize, usize, GpioMode)> = HashMap::new();
    // (I2C bus, address) -> (workload index, grant index) of its first grant.
    let mut addresses: HashMap<(&str, u16), (usize, usize)> = HashMap::new();
    let workloads = &parsed.spec.workloads;
    for (index, workload) in workloads.iter().enumerate() {
        for (at, grant) in workload.gpio.iter().enumerate() {
            let field = format!("gpio[{at}].pin");
            if board.pin(&grant.pin).is_none() {
                return Err(parsed.error_at(
                    index,
                    &field,
                    format!(
                        "pin \"{}\" is not on board \"{}\"{}",
                        grant.pin,
                        board.name,
                        offered(board.pins.iter().map(|p| p.name.as_str()))
                    ),
                ));
            }
            if let Some(&(first, first_at, first_mode)) = pins.get(grant.pin.as_str()) {
                let first_line = parsed
                    .error_at(first, &format!("gpio[{first_at}].pin"), "")
                    .line
                    .map(|line| format!(" on line {line}"))
                    .unwrap_or_default();
                let owner = if first == index {
                    "this workload".to_owned()
                } else {
                    format!("workload \"{}\"", workloads[first].name)
                };
                let message = if first_mode == GpioMode::Output && grant.mode == GpioMode::Output {
                    format!(
                        "pin \"{}\" is already granted as an output to {owner} (workloads[{first}].gpio[{first_at}]{first_line}); an output has one owner",
                        grant.pin
                    )
                } else {
                    format!(
                        "pin \"{}\" is already granted to {owner} (workloads[{first}].gpio[{first_at}]{first_line}); a GPIO line has one user",
                        grant.pin
                    )
                };
                return Err(parsed.error_at(index, &field, message));
            }
            pins.insert(&grant.pin, (index, at, grant.mode));
        }
        for (at, grant) in workload.spi.iter().enumerate() {
            let Some(bus) = board.spi_bus(&grant.bus) else {
                return Err(parsed.error_at(
                    index,
                    &format!("spi[{at}].bus"),
                    format!(
                        "SPI device \"{}\" is not on board \"{}\"{}",
                        grant.bus,
                        board.name,
                        offered(board.spi.iter().map(|b| b.name.as_str()))
                    ),
                ));
            };
            if let Some(limit) = bus.max_hz
                && grant.max_hz > limit
            {
                return Err(parsed.error_at(
                    index,
                    &format!("spi[{at}].max-hz"),
                    format!(
                        "{} Hz is above the {limit} Hz that SPI device \"{}\" of board \"{}\" allows",
                        grant.max_hz, grant.bus, board.name
                    ),
                ));
            }
        }
        for (at, grant) in workload.i2c.iter().enumerate() {
            if board.i2c_bus(&grant.bus).is_none() {
                return Err(parsed.error_at(
                    index,
                    &format!("i2c[{at}].bus"),
                    format!(
                        "I2C bus \"{}\" is not on board \"{}\"{}",
                        grant.bus,
                        board.name,
                        offered(board.i2c.iter().map(|b| b.name.as_str()))
                    ),
                ));
            }
            for (k, &address) in grant.addresses.iter().enumerate() {
                let key = (grant.bus.as_str(), address);
                if let Some(&(first, first_at)) = addresses.get(&key) {
                    let owner = if first == index {
                        "this workload".to_owned()
                    } else {
                        format!("workload \"{}\"", workloads[first].name)
                    };
                    return Err(parsed.error_at(
                        index,
                        &format!("i2c[{at}].addresses[{k}]"),
                        format!(
                            "address {address:#04x} on I2C bus \"{}\" is already granted to {owner} (workloads[{first}].i2c[{first_at}]); an I2C target has one owner",
                            grant.bus
                        ),
                    ));
                }
                addresses.insert(key, (index, at));
            }
        }
    }
    Ok(())
}

/// Whether `workload` asks for a pin that one of `others` (workloads of the other sources,
/// already applied) owns, under the same rules as [`check`]: an output has one owner, a GPIO
/// line one user. Returns the field of `workload` at fault (`gpio[1].pin`) and why.
pub fn owned_elsewhere<'a>(
    workload: &WorkloadSpec,
    others: impl IntoIterator<Item = (&'a str, &'a WorkloadSpec)>,
) -> Option<(String, String)> {
    let others: Vec<(&str, &WorkloadSpec)> = others.into_iter().collect();
    for (at, grant) in workload.gpio.iter().enumerate() {
        for (source, other) in &others {
            if other.name == workload.name {
                continue;
            }
            if let Some(theirs) = other.gpio.iter().find(|g| g.pin == grant.pin) {
                let what = if theirs.mode == GpioMode::Output && grant.mode == GpioMode::Output {
                    "an output has one owner"
                } else {
                    "a GPIO line has one user"
                };
                return Some((
                    format!("gpio[{at}].pin"),
                    format!(
                        "pin \"{}\" is already granted to workload \"{}\" of source {source}; {what}",
                        grant.pin, other.name
                    ),
                ));
            }
        }
    }
    for (at, grant) in workload.i2c.iter().enumerate() {
        for (k, address) in grant.addresses.iter().enumerate() {
            for (source, other) in &others {
                if other.name == workload.name {
                    continue;
                }
                let theirs = other
                    .i2c
                    .iter()
                    .any(|g| g.bus == grant.bus && g.addresses.contains(address));
                if theirs {
                    return Some((
                        format!("i2c[{at}].addresses[{k}]"),
                        format!(
                            "address {address:#04x} on I2C bus \"{}\" is already granted to workload \"{}\" of source {source}; an I2C target has one owner",
                            grant.bus, other.name
                        ),
                    ));
                }
            }
        }
    }
    None
}

/// `" (it has a, b, c)"`: what the board offers, so the fix is obvious; empty if nothing.
fn offered<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.len() {
        0 => " (it has none)".to_owned(),
        1..=8 => format!(" (it has {})", names.join(", ")),
        _ => format!(
            " (it has {}, ... {} in all; `lichen doctor` lists them)",
            names[..6].join(", "),
            names.len()
        ),
    }
}

/// What an output handle was opened with; a reload that keeps it reuses the open line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BindingKey {
    workload: String,
    pin: String,
    binding: String,
}

/// An input line a workload holds, with the settings (grant and trigger) it was last
/// configured for. A reload whose settings differ reconfigures the open line in place: the
/// running version holds the line until the switch, so a second request would be refused
/// as busy, and the edges queued meanwhile must reach whichever version handles them.
struct OpenInput {
    binding: String,
    pin: Weak<GrantedInput>,
}

#[cfg(target_os = "linux")]
mod linux;

/// `$open` on Linux; elsewhere an error saying the Linux backend is Linux only (the `sim`
/// board runs everywhere).
macro_rules! linux_backend {
    ($open:expr) => {{
        #[cfg(target_os = "linux")]
        let opened = $open;
        #[cfg(not(target_os = "linux"))]
        let opened = Err(lichen_devices::Error::Unsupported {
            what: "the Linux device backend".into(),
        });
        opened
    }};
}

/// The board's devices, opened on demand for workloads' grants.
pub struct DeviceHub {
    profile: BoardProfile,
    /// The simulated board of a `sim` profile; `None` when the Linux backend serves the board.
    sim: Option<SimBoard>,
    outputs: Mutex<HashMap<BindingKey, Weak<GrantedOutput>>>,
    /// Keyed by (workload, board pin).
    inputs: Mutex<HashMap<(String, String), OpenInput>>,
}

/// A device a grant names that did not open: the device, the grant and why.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// A GPIO pin.
    #[error("cannot open pin {pin} for grant \"{grant}\": {source}")]
    Pin {
        /// The board pin.
        pin: String,
        /// The grant's name.
        grant: String,
        /// Why.
        #[source]
        source: lichen_devices::Error,
    },
    /// An SPI device.
    #[error("cannot open SPI device {bus} for grant \"{grant}\": {source}")]
    Spi {
        /// The SPI device.
        bus: String,
        /// The grant's name.
        grant: String,
        /// Why.
        #[source]
        source: lichen_devices::Error,
    },
    /// An I2C bus.
    #[error("cannot open I2C bus {bus} for grant \"{grant}\": {source}")]
    I2c {
        /// The I2C bus.
        bus: String,
        /// The grant's name.
        grant: String,
        /// Why.
        #[source]
        source: lichen_devices::Error,
    },
}

impl DeviceHub {
    /// The devices of the built-in board profile `board`. A `sim` board starts with its ADC's
    /// channel 0 at [`SIM_ADC_CHANNEL0`] and its TMP102 and BME280 at [`SIM_TEMPERATURE_C`].
    pub fn open(board: &str) -> Result<Self> {
        let profile = BoardProfile::builtin(board)
            .with_context(|| format!("cannot load board profile {board:?}"))?;
        Self::from_profile(profile)
    }

    /// The devices of `profile`.
    pub fn from_profile(profile: BoardProfile) -> Result<Self> {
        let sim = if profile.backend == Backend::Sim {
            let sim = SimBoard::new(&profile)
                .with_context(|| format!("cannot simulate board {:?}", profile.name))?;
            for bus in &profile.spi {
                if let Some(adc) = sim.mcp3008(&bus.name) {
                    adc.set_channel(0, SIM_ADC_CHANNEL0)
                        .context("cannot set the simulated ADC")?;
                }
            }
            for bus in &profile.i2c {
                for target in &bus.sim {
                    if let Some(sensor) = sim.tmp102(&bus.name, target.address) {
                        sensor.set_celsius(SIM_TEMPERATURE_C);
                    }
                    if let Some(sensor) = sim.bme280(&bus.name, target.address) {
                        sensor.set_celsius(f64::from(SIM_TEMPERATURE_C));
                    }
                }
            }
            Some(sim)
        } else {
            None
        };
        Ok(Self {
            profile,
            sim,
            outputs: Mutex::new(HashMap::new()),
            inputs: Mutex::new(HashMap::new()),
        })
    }

    /// The board profile.
    pub fn profile(&self) -> &BoardProfile {
        &self.profile
    }

    /// The simulated board, when the profile is simulated (tests drive and observe it).
    pub fn sim(&self) -> Option<&SimBoard> {
        self.sim.as_ref()
    }

    /// Opens every device `spec` grants. Pins the workload's running instance already holds
    /// with the same settings are shared, not opened again; an input it holds with other
    /// settings (a reload that changes a trigger's edges or debounce, or the pin's bias) is
    /// shared and reconfigured in place, keeping its queued edges. Errors name the workload,
    /// the grant and the device.
    pub fn open_grants(&self, spec: &WorkloadSpec) -> Result<DeviceGrants, GrantError> {
        let mut grants = DeviceGrants::new();
        if spec.gpio.is_empty() && spec.spi.is_empty() && spec.i2c.is_empty() {
            return Ok(grants);
        }
        let consumer = format!("lichen:{}", spec.name);
        for grant in &spec.gpio {
            let trigger = spec.edge_trigger(&grant.name);
            let key = BindingKey {
                workload: spec.name.clone(),
                pin: grant.pin.clone(),
                binding: format!("{grant:?} {trigger:?}"),
            };
            let failed = |source| GrantError::Pin {
                pin: grant.pin.clone(),
                grant: grant.name.clone(),
                source,
            };
            match grant.mode {
                GpioMode::Output => {
                    let mut cache = lock(&self.outputs);
                    let pin = match cache.get(&key).and_then(Weak::upgrade) {
                        Some(pin) => pin,
                        None => {
                            let config = OutputConfig {
                                initial: grant.initial,
                                ..OutputConfig::default()
                            };
                            let line = self
                                .output(&grant.pin, &consumer, &config)
                                .map_err(failed)?;
                            let pin = Arc::new(GrantedOutput::new(
                                grant.pin.clone(),
                                grant.initial,
                                line,
                            ));
                            cache.retain(|_, weak| weak.strong_count() > 0);
                            cache.insert(key, Arc::downgrade(&pin));
                            pin
                        }
                    };
                    grants.add_output(grant.name.clone(), pin);
                }
                GpioMode::Input => {
                    // A gpio-edge trigger sets the edges and debounce it needs.
                    let config = InputConfig {
                        bias: grant.bias,
                        edge: trigger.map(|t| t.edge).or(grant.edge),
                        debounce: trigger.and_then(|t| t.debounce).or(grant.debounce),
                        ..InputConfig::default()
                    };
                    let mut cache = lock(&self.inputs);
                    let held = (key.workload, key.pin);
                    let open = cache
                        .get_mut(&held)
                        .and_then(|open| open.pin.upgrade().map(|pin| (pin, &mut open.binding)));
                    let pin = match open {
                        Some((pin, binding)) => {
                            if *binding != key.binding {
                                pin.reconfigure(&config).map_err(failed)?;
                                *binding = key.binding;
                            }
                            pin
                        }
                        None => {
                            let line =
                                self.input(&grant.pin, &consumer, &config).map_err(failed)?;
                            let pin = Arc::new(GrantedInput::new(grant.pin.clone(), line));
                            cache.retain(|_, open| open.pin.strong_count() > 0);
                            cache.insert(
                                held,
                                OpenInput {
                                    binding: key.binding,
                                    pin: Arc::downgrade(&pin),
                                },
                            );
                            pin
                        }
                    };
                    grants.add_input(grant.name.clone(), pin);
                }
            }
        }
        for grant in &spec.spi {
            let config = SpiConfig {
                max_hz: grant.max_hz,
                ..SpiConfig::default()
            };
            let device = self
                .spi(&grant.bus, config)
                .map_err(|source| GrantError::Spi {
                    bus: grant.bus.clone(),
                    grant: grant.name.clone(),
                    source,
                })?;
            grants.add_spi(
                grant.name.clone(),
                Arc::new(GrantedSpi::new(grant.bus.clone(), device)),
            );
        }
        for grant in &spec.i2c {
            let bus = self.i2c(&grant.bus).map_err(|source| GrantError::I2c {
                bus: grant.bus.clone(),
                grant: grant.name.clone(),
                source,
            })?;
            grants.add_i2c(
                grant.name.clone(),
                Arc::new(GrantedI2c::new(
                    grant.bus.clone(),
                    grant.addresses.clone(),
                    bus,
                )),
            );
        }
        Ok(grants)
    }

    /// Requests the board pin `pin` as an output, on the board's backend.
    fn output(
        &self,
        pin: &str,
        consumer: &str,
        config: &OutputConfig,
    ) -> lichen_devices::Result<OutputPinBox> {
        match &self.sim {
            Some(sim) => Ok(Box::new(sim.output(pin, consumer, config)?)),
            None => linux_backend!(linux::output(&self.profile, pin, consumer, config)),
        }
    }

    /// Requests the board pin `pin` as an input, on the board's backend.
    fn input(
        &self,
        pin: &str,
        consumer: &str,
        config: &InputConfig,
    ) -> lichen_devices::Result<InputPinBox> {
        match &self.sim {
            Some(sim) => Ok(Box::new(sim.input(pin, consumer, config)?)),
            None => linux_backend!(linux::input(&self.profile, pin, consumer, config)),
        }
    }

    /// Opens the SPI device `bus` with `config`, on the board's backend.
    fn spi(&self, bus: &str, config: SpiConfig) -> lichen_devices::Result<SpiDeviceBox> {
        match &self.sim {
            Some(sim) => Ok(Box::new(sim.spi(bus, config)?)),
            None => linux_backend!(linux::spi(&self.profile, bus, config)),
        }
    }

    /// Opens the I2C bus `bus`, on the board's backend.
    fn i2c(&self, bus: &str) -> lichen_devices::Result<I2cBusBox> {
        match &self.sim {
            Some(sim) => Ok(Box::new(sim.i2c(bus)?)),
            None => linux_backend!(linux::i2c(&self.profile, bus)),
        }
    }
}

impl std::fmt::Debug for DeviceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHub")
            .field("board", &self.profile.name)
            .finish_non_exhaustive()
    }
}

/// Locks a handle cache; a poisoned lock leaves a map of weak references, still valid.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
