//! Board profiles: what a board's header offers and what the board can run.
//!
//! A profile (`boards/<name>.toml`, embedded in the crate so a static binary carries them)
//! maps header pin names and physical pin numbers to GPIO line labels, names the SPI and I2C
//! buses with their device nodes, and states facts: CPU architecture, RAM sizes, and which
//! isolation tiers (wasm, container, microvm) the board can have. [`detect`] picks a profile
//! from the device tree's model string.
//!
//! ```
//! use lichen_devices::board::{BoardProfile, Isolation};
//!
//! let pi = BoardProfile::builtin("rpi5")?;
//! let pin = pi.pin("GPIO17").expect("the Pi header has GPIO17");
//! assert_eq!(pin.physical, Some(11));
//! assert_eq!(pi.spi_bus("spi0.0").map(|b| b.device.as_str()), Some("/dev/spidev0.0"));
//! assert!(pi.supports(Isolation::Microvm));
//! # Ok::<(), lichen_devices::Error>(())
//! ```

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, LineSpec, Result};

/// The profiles built into the crate, by name, in the order [`detect`] tries them.
const BUILTIN: &[(&str, &str)] = &[
    ("sim", include_str!("../../boards/sim.toml")),
    ("rpi5", include_str!("../../boards/rpi5.toml")),
    ("rpi4b", include_str!("../../boards/rpi4b.toml")),
    ("rpi3bplus", include_str!("../../boards/rpi3bplus.toml")),
    ("rpi-zero-2w", include_str!("../../boards/rpi-zero-2w.toml")),
    ("visionfive2", include_str!("../../boards/visionfive2.toml")),
    (
        "qemu-x86-test",
        include_str!("../../boards/qemu-x86-test.toml"),
    ),
];

/// The profile used when nothing else fits.
pub const DEFAULT_PROFILE: &str = "sim";

/// Where the device tree states the board model.
pub const DEVICE_TREE_MODEL: &str = "/proc/device-tree/model";

/// Which backend serves a board's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Linux character devices (gpiochip, spidev, i2c-dev).
    Linux,
    /// The simulated devices of [`crate::sim`].
    Sim,
}

/// CPU architecture of a board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// 64-bit Arm.
    Aarch64,
    /// 64-bit RISC-V (RV64GC).
    Riscv64,
    /// 64-bit x86.
    X86_64,
    /// Whatever the host is (the simulated board).
    Host,
}

/// An isolation tier a workload can run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// WebAssembly components in the agent's Wasmtime engine.
    Wasm,
    /// OCI containers through crun or runc.
    Container,
    /// MicroVMs under KVM; needs the CPU's virtualisation extension and a KVM kernel.
    Microvm,
}

/// A header pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The name grants use (`GPIO17`).
    pub name: String,
    /// Physical pin number on the header, when the board has a numbered header.
    #[serde(default)]
    pub physical: Option<u8>,
    /// The GPIO line behind the pin: a label, or chip label and offset.
    pub line: LineSpec,
    /// Other uses of the pin, for people reading `lichen doctor` (`I2C1 SDA`, `SPI0 CE0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Which simulated peripheral sits on a simulated SPI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimSpiModel {
    /// [`crate::sim::Mcp3008`].
    Mcp3008,
}

/// Which simulated peripheral sits on a simulated I2C bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimI2cModel {
    /// [`crate::sim::Tmp102`].
    Tmp102,
    /// [`crate::sim::Bme280`].
    Bme280,
}

/// A simulated I2C target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimI2cTarget {
    /// The model.
    pub model: SimI2cModel,
    /// Its 7-bit address.
    pub address: u16,
}

/// An SPI device (bus and chip-select) on the board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiBus {
    /// The name grants use: `spi<bus>.<chip-select>`.
    pub name: String,
    /// The device node: `/dev/spidev<bus>.<chip-select>`.
    pub device: String,
    /// Highest clock the controller allows, in Hz.
    #[serde(default)]
    pub max_hz: Option<u32>,
    /// On a simulated board, the peripheral behind this chip-select.
    #[serde(default)]
    pub sim: Option<SimSpiModel>,
}

/// An I2C bus on the board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cBus {
    /// The name grants use: `i2c-<n>`.
    pub name: String,
    /// The device node: `/dev/i2c-<n>`.
    pub device: String,
    /// On a simulated board, the targets on the bus.
    #[serde(default)]
    pub sim: Vec<SimI2cTarget>,
}

/// A board profile, parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    /// Short name (`rpi5`), also the file name.
    pub name: String,
    /// What the board is, for people.
    pub description: String,
    /// Which backend serves its devices.
    pub backend: Backend,
    /// CPU architecture.
    pub arch: Arch,
    /// RAM sizes the board ships with, in MiB (empty: whatever the host has).
    #[serde(default)]
    pub ram_mib: Vec<u32>,
    /// Isolation tiers the board can have.
    pub isolation: Vec<Isolation>,
    /// Device-tree model prefixes that identify the board (`/proc/device-tree/model`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Header pins.
    #[serde(default)]
    pub pins: Vec<Pin>,
    /// SPI devices.
    #[serde(default)]
    pub spi: Vec<SpiBus>,
    /// I2C buses.
    #[serde(default)]
    pub i2c: Vec<I2cBus>,
}

impl BoardProfile {
    /// Parse and validate a profile from TOML text; `origin` names it in errors (a file name
    /// or profile name).
    pub fn from_toml(origin: &str, text: &str) -> Result<Self> {
        let profile: BoardProfile = toml::from_str(text)
            .map_err(|e| Error::profile(origin, e.message().trim_end().to_owned()))?;
        profile.validate()?;
        Ok(profile)
    }

    /// Read, parse and validate a profile file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::profile(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::from_toml(&path.display().to_string(), &text)
    }

    /// A profile built into the crate.
    pub fn builtin(name: &str) -> Result<Self> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::profile(
                name,
                format!(
                    "no such built-in profile (known: {})",
                    builtin_names().join(", ")
                ),
            )
        })?;
        Self::from_toml(name, text)
    }

    /// The pin with this name.
    pub fn pin(&self, name: &str) -> Option<&Pin> {
        self.pins.iter().find(|p| p.name == name)
    }

    /// The pin at this physical header position.
    pub fn pin_by_physical(&self, physical: u8) -> Option<&Pin> {
        self.pins.iter().find(|p| p.physical == Some(physical))
    }

    /// The SPI device with this name (`spi0.0`).
    pub fn spi_bus(&self, name: &str) -> Option<&SpiBus> {
        self.spi.iter().find(|b| b.name == name)
    }

    /// The I2C bus with this name (`i2c-1`).
    pub fn i2c_bus(&self, name: &str) -> Option<&I2cBus> {
        self.i2c.iter().find(|b| b.name == name)
    }

    /// Whether the board can run workloads in `tier`.
    pub fn supports(&self, tier: Isolation) -> bool {
        self.isolation.contains(&tier)
    }

    /// Check the profile is internally consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::profile(&self.name, message));
        if self.name.is_empty() {
            return bad("name is empty".into());
        }
        if !self.isolation.contains(&Isolation::Wasm) {
            return bad("isolation must include \"wasm\": every board runs Wasm workloads".into());
        }
        let mut names = HashSet::new();
        let mut physical = HashSet::new();
        let mut lines = HashSet::new();
        for pin in &self.pins {
            if pin.name.is_empty() {
                return bad("a pin has an empty name".into());
            }
            if !names.insert(pin.name.as_str()) {
                return bad(format!("pin name \"{}\" appears more than once", pin.name));
            }
            if let Some(n) = pin.physical
                && !physical.insert(n)
            {
                return bad(format!(
                    "physical pin {n} is given to more than one pin (second: \"{}\")",
                    pin.name
                ));
            }
            if let LineSpec::Label(l) = &pin.line
                && l.is_empty()
            {
                return bad(format!("pin \"{}\" has an empty line label", pin.name));
            }
            if !lines.insert(&pin.line) {
                return bad(format!(
                    "line {} is behind more than one pin (second: \"{}\")",
                    pin.line, pin.name
                ));
            }
            if self.backend == Backend::Sim && matches!(pin.line, LineSpec::ChipOffset { .. }) {
                return bad(format!(
                    "pin \"{}\": simulated lines are found by label, not chip and offset",
                    pin.name
                ));
            }
        }
        let mut bus_names = HashSet::new();
        for bus in &self.spi {
            let Some((b, cs)) = bus
                .name
                .strip_prefix("spi")
                .and_then(|rest| rest.split_once('.'))
                .filter(|(b, cs)| is_number(b) && is_number(cs))
            else {
                return bad(format!(
                    "SPI bus \"{}\" is not named spi<bus>.<chip-select>",
                    bus.name
                ));
            };
            let expected = format!("/dev/spidev{b}.{cs}");
            if bus.device != expected {
                return bad(format!(
                    "SPI bus \"{}\" must use {expected}, not {}",
                    bus.name, bus.device
                ));
            }
            if !bus_names.insert(bus.name.as_str()) {
                return bad(format!("bus \"{}\" appears more than once", bus.name));
            }
            if self.backend == Backend::Sim && bus.sim.is_none() {
                return bad(format!(
                    "SPI bus \"{}\" on a simulated board needs a `sim` model",
                    bus.name
                ));
            }
            if bus.max_hz == Some(0) {
                return bad(format!("SPI bus \"{}\" has max_hz = 0", bus.name));
            }
        }
        for bus in &self.i2c {
            let Some(n) = bus.name.strip_prefix("i2c-").filter(|n| is_number(n)) else {
                return bad(format!("I2C bus \"{}\" is not named i2c-<n>", bus.name));
            };
            let expected = format!("/dev/i2c-{n}");
            if bus.device != expected {
                return bad(format!(
                    "I2C bus \"{}\" must use {expected}, not {}",
                    bus.name, bus.device
                ));
            }
            if !bus_names.insert(bus.name.as_str()) {
                return bad(format!("bus \"{}\" appears more than once", bus.name));
            }
            if self.backend != Backend::Sim && !bus.sim.is_empty() {
                return bad(format!(
                    "I2C bus \"{}\" lists simulated targets on a board that is not simulated",
                    bus.name
                ));
            }
            let mut addresses = HashSet::new();
            for t in &bus.sim {
                if !(0x08..=0x77).contains(&t.address) {
                    return bad(format!(
                        "I2C bus \"{}\": address {:#04x} is outside the 7-bit range 0x08..=0x77",
                        bus.name, t.address
                    ));
                }
                if !addresses.insert(t.address) {
                    return bad(format!(
                        "I2C bus \"{}\": address {:#04x} is used twice",
                        bus.name, t.address
                    ));
                }
            }
        }
        if self.backend != Backend::Sim && self.spi.iter().any(|b| b.sim.is_some()) {
            return bad("SPI `sim` models are only for simulated boards".into());
        }
        Ok(())
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Names of the built-in profiles.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// Every built-in profile, parsed and validated.
pub fn builtin_profiles() -> Result<Vec<BoardProfile>> {
    BUILTIN
        .iter()
        .map(|(n, t)| BoardProfile::from_toml(n, t))
        .collect()
}

/// The outcome of [`detect`].
#[derive(Debug, Clone)]
pub struct Detection {
    /// The chosen profile.
    pub profile: BoardProfile,
    /// The device-tree model string, when the host has one.
    pub model: Option<String>,
    /// Whether the model matched a profile (`false`: fell back to `sim`).
    pub matched: bool,
}

/// Pick a profile from `/proc/device-tree/model`; fall back to `sim` when there is no device
/// tree or no profile claims the model.
pub fn detect() -> Result<Detection> {
    let model = std::fs::read(DEVICE_TREE_MODEL).ok().map(|raw| {
        String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .trim()
            .to_owned()
    });
    detect_from_model(model.as_deref())
}

/// Like [`detect`], for a model string already read. The longest matching prefix wins, so
/// `Raspberry Pi 5 Model B` is not taken for a `Raspberry Pi 500`.
pub fn detect_from_model(model: Option<&str>) -> Result<Detection> {
    let profiles = builtin_profiles()?;
    let best = model.and_then(|m| {
        profiles
            .iter()
            .flat_map(|p| p.models.iter().map(move |prefix| (p, prefix)))
            .filter(|(_, prefix)| m.starts_with(prefix.as_str()))
            .max_by_key(|(_, prefix)| prefix.len())
            .map(|(p, _)| p.clone())
    });
    let matched = best.is_some();
    let profile = match best {
        Some(p) => p,
        None => BoardProfile::builtin(DEFAULT_PROFILE)?,
    };
    Ok(Detection {
        profile,
        model: model.map(str::to_owned),
        matched,
    })
}

#[cfg(test)]
mod tests;
