//! The simulated backend: a gpiochip, an SPI ADC and I2C environment sensors that behave
//! like their datasheets, behind the same embedded-hal traits as [`crate::linux`] (on Linux).
//!
//! It builds on every platform, backs the `sim` board profile (the default), and lets tests
//! drive inputs and observe outputs.

mod bme280;
mod board;
mod gpio;
mod i2c;
mod spi;

pub use bme280::{Bme280, Bme280Calibration};
pub use board::SimBoard;
pub use gpio::{SimChip, SimEdgeWatch, SimInputPin, SimOutputPin};
pub use i2c::{I2cPeer, SimI2cBus, Tmp102};
pub use spi::{Mcp3008, SimSpiDevice, SpiPeer};
