//! Opening grants on a board whose backend is Linux: GPIO lines found by label through the
//! character device (uAPI v2), SPI devices through spidev, I2C buses through i2c-dev.
//!
//! A pin, bus or device node that is missing or not accessible fails here, at the start of
//! the workload that asked for it, with an error naming the node or line; other workloads are
//! not affected. A chip removed while a workload runs makes that workload's later calls fail
//! (the host APIs turn them into `hardware(...)` / `bus(...)` errors for the guest).

use lichen_devices::board::BoardProfile;
use lichen_devices::embedded_hal::digital::{ErrorType, InputPin};
use lichen_devices::linux::{LinuxI2cBus, LinuxInputPin, LinuxOutputPin, LinuxSpiDevice};
use lichen_devices::{EdgeEvent, EdgeWatch, Error, InputConfig, OutputConfig, SpiConfig};
use lichen_host_apis::{EdgeInput, I2cBusBox, InputPinBox, OutputPinBox, SpiDeviceBox};

/// A Linux input line seen as an [`EdgeInput`]: its edge events are read from the kernel's
/// queue without waiting.
#[derive(Debug)]
pub(super) struct LinuxEdgeInput(LinuxInputPin);

impl ErrorType for LinuxEdgeInput {
    type Error = Error;
}

impl InputPin for LinuxEdgeInput {
    fn is_high(&mut self) -> Result<bool, Error> {
        self.0.is_high()
    }

    fn is_low(&mut self) -> Result<bool, Error> {
        self.0.is_low()
    }
}

impl EdgeInput for LinuxEdgeInput {
    fn try_edge(&mut self) -> Result<Option<EdgeEvent>, Error> {
        self.0.try_event()
    }

    fn edge_watch(&self) -> Result<EdgeWatch, Error> {
        Ok(EdgeWatch::Linux(self.0.edge_watch()?))
    }

    fn reconfigure(&mut self, config: &InputConfig) -> Result<(), Error> {
        self.0.reconfigure(config)
    }
}

/// The error for a pin or bus the profile does not have (the deploy-time check makes this a
/// host bug, but it is reported, not trapped).
fn not_on_board(profile: &BoardProfile, what: &str) -> Error {
    Error::Profile {
        board: profile.name.clone(),
        message: format!("has no {what}"),
    }
}

/// Requests the board pin `pin` (a profile pin name) as an output.
pub(super) fn output(
    profile: &BoardProfile,
    pin: &str,
    consumer: &str,
    config: &OutputConfig,
) -> Result<OutputPinBox, Error> {
    let line = &profile
        .pin(pin)
        .ok_or_else(|| not_on_board(profile, &format!("pin \"{pin}\"")))?
        .line;
    Ok(Box::new(LinuxOutputPin::request(line, consumer, config)?))
}

/// Requests the board pin `pin` as an input, with its bias, edges and debounce.
pub(super) fn input(
    profile: &BoardProfile,
    pin: &str,
    consumer: &str,
    config: &InputConfig,
) -> Result<InputPinBox, Error> {
    let line = &profile
        .pin(pin)
        .ok_or_else(|| not_on_board(profile, &format!("pin \"{pin}\"")))?
        .line;
    Ok(Box::new(LinuxEdgeInput(LinuxInputPin::request(
        line, consumer, config,
    )?)))
}

/// Opens the SPI device `bus` (`spi0.0`) through its spidev node, with `config`.
pub(super) fn spi(
    profile: &BoardProfile,
    bus: &str,
    config: SpiConfig,
) -> Result<SpiDeviceBox, Error> {
    let node = &profile
        .spi_bus(bus)
        .ok_or_else(|| not_on_board(profile, &format!("SPI device \"{bus}\"")))?
        .device;
    Ok(Box::new(LinuxSpiDevice::open(node, config)?))
}

/// Opens the I2C bus `bus` (`i2c-1`) through its i2c-dev node.
pub(super) fn i2c(profile: &BoardProfile, bus: &str) -> Result<I2cBusBox, Error> {
    let node = &profile
        .i2c_bus(bus)
        .ok_or_else(|| not_on_board(profile, &format!("I2C bus \"{bus}\"")))?
        .device;
    Ok(Box::new(LinuxI2cBus::open(node)?))
}
