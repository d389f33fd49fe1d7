//! The Linux backend: GPIO over the character device (uAPI v2), SPI over spidev, I2C over
//! i2c-dev, each behind the embedded-hal 1.0 traits. Linux only.
//!
//! No `unsafe` here: `gpiocdev`, `spidev` and `i2cdev` wrap the ioctls.

mod gpio;
mod i2c;
mod spi;

pub use gpio::{LineLocation, LinuxInputPin, LinuxOutputPin, chip_paths, find_line, locate};
pub use i2c::LinuxI2cBus;
pub use spi::LinuxSpiDevice;
