//! GPIO, SPI and I2C access for Lichen device functions, behind the embedded-hal 1.0 traits.
//!
//! Two backends implement the same traits (`OutputPin`, `StatefulOutputPin`, `InputPin`,
//! embedded-hal-async's `Wait`, `SpiDevice`, `I2c`), so driver code is written once:
//! - [`linux`] (Linux only): GPIO lines over the v2 character-device uAPI (`gpiocdev`), found by
//!   line *label* across every gpiochip; SPI over spidev; I2C over i2c-dev.
//! - [`sim`] (everywhere): a simulated gpiochip whose inputs a test drives and whose outputs it
//!   observes, with edge events and debounce; an SPI bus with an MCP3008 ADC model and an I2C
//!   bus with TMP102 and BME280 sensor models, all following their datasheets.
//!
//! [`board`] loads board profiles (`boards/*.toml`, embedded in the binary): header pin names
//! mapped to line labels, SPI and I2C buses, and facts such as arch and isolation tiers.
//! [`inventory()`] lists what the host really has, for `lichen doctor`.
//!
//! The crate knows nothing of Wasm, grants or MQTT; the agent wires it to them.
//!
//! # Example
//! ```
//! use embedded_hal::digital::{InputPin, OutputPin, StatefulOutputPin};
//! use lichen_devices::sim::SimChip;
//! use lichen_devices::{InputConfig, Level, OutputConfig};
//!
//! # fn main() -> lichen_devices::Result<()> {
//! let chip = SimChip::new("sim-gpio", ["GPIO17", "GPIO27"]);
//! let mut led = chip.request_output("GPIO17", "demo", &OutputConfig::default())?;
//! let mut button = chip.request_input("GPIO27", "demo", &InputConfig::default())?;
//!
//! led.set_high()?;
//! assert_eq!(chip.level("GPIO17")?, Level::High);
//! assert!(led.is_set_high()?);
//!
//! chip.drive("GPIO27", Level::High)?;
//! assert!(button.is_high()?);
//! # Ok(())
//! # }
//! ```

pub mod board;
mod error;
pub mod inventory;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod sim;

use std::time::Duration;

/// The embedded-hal 1.0 traits this crate implements, re-exported so that users wrap or
/// implement them at the same version without a dependency of their own.
pub use embedded_hal;
/// The embedded-hal-async 1.0 traits this crate implements (`digital::Wait`), re-exported
/// for the same reason.
pub use embedded_hal_async;
pub use error::{Error, Result};
pub use inventory::{Inventory, inventory};

/// The electrical level of a line.
///
/// Levels in this crate are always physical: with `active_low`, `High` is the *inactive* state.
/// The embedded-hal methods (`set_high`, `is_high`) are physical too, as embedded-hal defines them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Low (0).
    #[default]
    Low,
    /// High (1).
    High,
}

impl Level {
    /// The other level.
    pub fn inverted(self) -> Level {
        match self {
            Level::Low => Level::High,
            Level::High => Level::Low,
        }
    }

    /// `true` for `High`.
    pub fn is_high(self) -> bool {
        self == Level::High
    }
}

impl From<bool> for Level {
    fn from(high: bool) -> Self {
        if high { Level::High } else { Level::Low }
    }
}

impl From<embedded_hal::digital::PinState> for Level {
    fn from(s: embedded_hal::digital::PinState) -> Self {
        match s {
            embedded_hal::digital::PinState::Low => Level::Low,
            embedded_hal::digital::PinState::High => Level::High,
        }
    }
}

/// An edge seen on an input line, in physical terms (rising = low to high on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    /// Low to high.
    Rising,
    /// High to low.
    Falling,
}

/// Which edges an input reports as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeDetection {
    /// Only low-to-high edges.
    Rising,
    /// Only high-to-low edges.
    Falling,
    /// Both edges.
    Both,
}

impl EdgeDetection {
    /// Whether this detection setting reports `edge`.
    pub fn matches(self, edge: Edge) -> bool {
        matches!(
            (self, edge),
            (EdgeDetection::Both, _)
                | (EdgeDetection::Rising, Edge::Rising)
                | (EdgeDetection::Falling, Edge::Falling)
        )
    }
}

/// Waits for an input line's edge events apart from the pin that takes them, so that a
/// task sleeps until the kernel (or the simulated chip) has an event instead of polling:
/// [`linux::LinuxEdgeWatch`] or [`sim::SimEdgeWatch`].
#[derive(Debug)]
pub enum EdgeWatch {
    /// A line of the simulated chip.
    Sim(sim::SimEdgeWatch),
    /// A line request on a Linux gpiochip.
    #[cfg(target_os = "linux")]
    Linux(linux::LinuxEdgeWatch),
}

impl EdgeWatch {
    /// Waits until an edge event may be queued on the line (the caller then takes what is
    /// queued; a wake-up with nothing queued is possible). Fails once the line is gone
    /// (released, chip removed), so a watcher ends with its pin.
    pub async fn queued(&mut self) -> Result<()> {
        match self {
            EdgeWatch::Sim(watch) => watch.queued().await,
            #[cfg(target_os = "linux")]
            EdgeWatch::Linux(watch) => watch.queued().await,
        }
    }
}

/// An edge event: which edge, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeEvent {
    /// The edge, in physical terms.
    pub edge: Edge,
    /// When it happened, in nanoseconds of `CLOCK_MONOTONIC` (Linux: the kernel's timestamp;
    /// sim: the simulated chip's clock).
    pub timestamp_ns: u64,
    /// Sequence number of this event on its line, starting at 1.
    pub seqno: u32,
}

/// Internal pull resistor of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    /// No pull resistor.
    Disabled,
    /// Pull up to the supply.
    PullUp,
    /// Pull down to ground.
    PullDown,
}

/// How an output drives its line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Drive {
    /// Drives both levels.
    #[default]
    PushPull,
    /// Drives low only; high is left floating (needs a pull-up).
    OpenDrain,
    /// Drives high only; low is left floating (needs a pull-down).
    OpenSource,
}

/// How to request a line as an output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputConfig {
    /// Physical level driven as soon as the line is requested.
    pub initial: Level,
    /// Push-pull, open-drain or open-source.
    pub drive: Drive,
    /// The line is active when low (only changes the logical view, see [`Level`]).
    pub active_low: bool,
}

/// How to request a line as an input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InputConfig {
    /// Pull resistor; `None` leaves the line's bias as it is.
    pub bias: Option<Bias>,
    /// The line is active when low (only changes the logical view, see [`Level`]).
    pub active_low: bool,
    /// Report edges as [`EdgeEvent`]s; `None` for no events.
    pub edge: Option<EdgeDetection>,
    /// A level change must hold this long before it counts; shorter glitches are dropped.
    pub debounce: Option<Duration>,
}

/// Where a line is: by label (the normal case), or by chip label and offset for boards whose
/// device tree names no lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LineSpec {
    /// A line label as the kernel reports it (`gpioinfo`), such as `GPIO17`.
    Label(String),
    /// A chip found by its label (such as `13040000.pinctrl`) and the line's offset on it.
    ChipOffset {
        /// The gpiochip's label.
        chip: String,
        /// The line's offset on that chip.
        offset: u32,
    },
}

impl std::fmt::Display for LineSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineSpec::Label(l) => f.write_str(l),
            LineSpec::ChipOffset { chip, offset } => write!(f, "{chip}:{offset}"),
        }
    }
}

/// SPI clock polarity and phase, modes 0 to 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpiMode {
    /// CPOL=0, CPHA=0.
    #[default]
    Mode0,
    /// CPOL=0, CPHA=1.
    Mode1,
    /// CPOL=1, CPHA=0.
    Mode2,
    /// CPOL=1, CPHA=1.
    Mode3,
}

/// How to configure an SPI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpiConfig {
    /// Clock mode.
    pub mode: SpiMode,
    /// Maximum clock speed in Hz.
    pub max_hz: u32,
    /// Bits per word (8 for nearly every device).
    pub bits_per_word: u8,
}

impl Default for SpiConfig {
    fn default() -> Self {
        SpiConfig {
            mode: SpiMode::Mode0,
            max_hz: 1_000_000,
            bits_per_word: 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_detection_matches_edges() {
        assert!(EdgeDetection::Both.matches(Edge::Rising));
        assert!(EdgeDetection::Falling.matches(Edge::Falling));
        assert!(!EdgeDetection::Rising.matches(Edge::Falling));
    }

    #[test]
    fn line_spec_parses_label_or_chip_offset() {
        #[derive(serde::Deserialize)]
        struct T {
            a: LineSpec,
            b: LineSpec,
        }
        let t: T =
            toml::from_str("a = \"GPIO17\"\nb = { chip = \"13040000.pinctrl\", offset = 42 }\n")
                .expect("valid TOML");
        assert_eq!(t.a, LineSpec::Label("GPIO17".into()));
        assert_eq!(t.b.to_string(), "13040000.pinctrl:42");
    }
}
