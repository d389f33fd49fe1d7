//! The Linux backend: GPIO over the character device (uAPI v2), SPI over spidev, I2C over
//! i2c-dev, each behind the embedded-hal 1.0 traits. Linux only.
//!
//! `gpiocdev`, `spidev` and `i2cdev` wrap the ioctls; one `unsafe` block asks an I2C
//! adapter what it can do (`I2C_FUNCS`, which i2cdev lacks), another registers a line
//! request's fd with tokio's reactor for the async `Wait` (tokio's `AsyncFd` constructors are
//! `unsafe`).

mod gpio;
mod i2c;
mod spi;

pub use gpio::{
    LineLocation, LinuxEdgeWatch, LinuxInputPin, LinuxOutputPin, chip_paths, find_line, locate,
};
pub use i2c::LinuxI2cBus;
pub use spi::LinuxSpiDevice;
