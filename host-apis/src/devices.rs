//! The device handles a workload was granted, keyed by the logical names of its deployment.
//!
//! The agent opens the board's pins and buses (through `lichen-devices`, on whichever backend
//! the board uses) and hands them to [`DeviceGrants`]; the `gpio`, `spi` and `i2c` host
//! interfaces look every call up here, so anything not in the grants is refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use embedded_hal::digital::{InputPin, StatefulOutputPin};
use embedded_hal::i2c::{I2c, SevenBitAddress};
use embedded_hal::spi::SpiDevice;
use lichen_devices::Level;

/// A line requested as an output, behind embedded-hal's `StatefulOutputPin`.
pub type OutputPinBox = Box<dyn StatefulOutputPin<Error = lichen_devices::Error> + Send>;
/// A line requested as an input, behind embedded-hal's `InputPin`, whose edge events (when
/// the line was requested with edge detection) can be taken.
pub type InputPinBox = Box<dyn EdgeInput>;

/// An input line that may queue edge events: embedded-hal's `InputPin` plus the event queue
/// the kernel (or the simulator) keeps for the line.
pub trait EdgeInput: InputPin<Error = lichen_devices::Error> + Send {
    /// Takes the next queued edge event, without waiting.
    fn try_edge(&mut self) -> Result<Option<lichen_devices::EdgeEvent>, lichen_devices::Error>;

    /// A handle that waits, apart from the pin, until an edge event is queued.
    fn edge_watch(&self) -> Result<lichen_devices::EdgeWatch, lichen_devices::Error>;

    /// Changes the line's input settings in place, keeping it requested and its queued
    /// events (a hot reload that changes a trigger's edges or debounce).
    fn reconfigure(
        &mut self,
        config: &lichen_devices::InputConfig,
    ) -> Result<(), lichen_devices::Error>;
}

impl EdgeInput for lichen_devices::sim::SimInputPin {
    fn try_edge(&mut self) -> Result<Option<lichen_devices::EdgeEvent>, lichen_devices::Error> {
        self.try_event()
    }

    fn edge_watch(&self) -> Result<lichen_devices::EdgeWatch, lichen_devices::Error> {
        Ok(lichen_devices::EdgeWatch::Sim(
            lichen_devices::sim::SimInputPin::edge_watch(self),
        ))
    }

    fn reconfigure(
        &mut self,
        config: &lichen_devices::InputConfig,
    ) -> Result<(), lichen_devices::Error> {
        lichen_devices::sim::SimInputPin::reconfigure(self, config)
    }
}
/// An SPI device (bus and chip-select), behind embedded-hal's `SpiDevice`.
pub type SpiDeviceBox = Box<dyn SpiDevice<u8, Error = lichen_devices::Error> + Send>;
/// An I2C bus with 7-bit addresses, behind embedded-hal's `I2c`.
pub type I2cBusBox = Box<dyn I2c<SevenBitAddress, Error = lichen_devices::Error> + Send>;

/// The error text for the guest, naming the board's bus `bus` unless the driver's message
/// already starts with it (the simulated buses carry the board's names, spidev and i2c-dev
/// errors carry the device node).
pub(crate) fn naming(bus: &str, error: &lichen_devices::Error) -> String {
    let text = error.to_string();
    if text.starts_with(&format!("{bus}: ")) {
        text
    } else {
        format!("{bus}: {text}")
    }
}

/// Locks a device handle; a poisoned lock only means a thread panicked mid-call, and the
/// handle is still usable (the hardware state is whatever the last call left).
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An output pin granted to a workload, with its safe state.
///
/// When the last reference is dropped (the workload stopped or crashed) the pin is driven to
/// its safe level before the line is released.
pub struct GrantedOutput {
    pin: String,
    safe: Level,
    inner: Mutex<OutputPinBox>,
}

impl GrantedOutput {
    /// Wraps the output `pin` (the board pin name, for messages), whose safe state is `safe`
    /// (the deployment's `initial` level).
    pub fn new(pin: impl Into<String>, safe: Level, inner: OutputPinBox) -> Self {
        Self {
            pin: pin.into(),
            safe,
            inner: Mutex::new(inner),
        }
    }

    /// The board pin name.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The level the pin returns to on stop, reload and crash.
    pub fn safe_level(&self) -> Level {
        self.safe
    }

    /// Drives the safe level.
    pub fn set_safe_state(&self) -> Result<(), lichen_devices::Error> {
        let mut pin = lock(&self.inner);
        match self.safe {
            Level::Low => pin.set_low(),
            Level::High => pin.set_high(),
        }
    }

    /// Runs `f` on the pin.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut OutputPinBox) -> T) -> T {
        f(&mut lock(&self.inner))
    }
}

impl Drop for GrantedOutput {
    fn drop(&mut self) {
        // Best effort: a removed chip cannot be driven any more, and there is nobody to tell.
        let _ = self.set_safe_state();
    }
}

impl std::fmt::Debug for GrantedOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantedOutput")
            .field("pin", &self.pin)
            .field("safe", &self.safe)
            .finish_non_exhaustive()
    }
}

/// An input pin granted to a workload.
pub struct GrantedInput {
    pin: String,
    inner: Mutex<InputPinBox>,
}

impl GrantedInput {
    /// Wraps the input `pin` (the board pin name, for messages).
    pub fn new(pin: impl Into<String>, inner: InputPinBox) -> Self {
        Self {
            pin: pin.into(),
            inner: Mutex::new(inner),
        }
    }

    /// The board pin name.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// Takes the next queued edge event of the pin, without waiting.
    pub fn try_edge(&self) -> Result<Option<lichen_devices::EdgeEvent>, lichen_devices::Error> {
        lock(&self.inner).try_edge()
    }

    /// A handle that waits for the pin's edge events without holding the pin (the guest
    /// may read it meanwhile).
    pub fn edge_watch(&self) -> Result<lichen_devices::EdgeWatch, lichen_devices::Error> {
        lock(&self.inner).edge_watch()
    }

    /// Changes the pin's input settings in place (see [`EdgeInput::reconfigure`]).
    pub fn reconfigure(
        &self,
        config: &lichen_devices::InputConfig,
    ) -> Result<(), lichen_devices::Error> {
        lock(&self.inner).reconfigure(config)
    }

    /// Runs `f` on the pin.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut InputPinBox) -> T) -> T {
        f(&mut lock(&self.inner))
    }
}

impl std::fmt::Debug for GrantedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantedInput")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

/// An SPI device granted to a workload, already configured with the granted clock.
pub struct GrantedSpi {
    bus: String,
    inner: Mutex<SpiDeviceBox>,
}

impl GrantedSpi {
    /// Wraps the SPI device `bus` (`spi0.0`, for messages).
    pub fn new(bus: impl Into<String>, inner: SpiDeviceBox) -> Self {
        Self {
            bus: bus.into(),
            inner: Mutex::new(inner),
        }
    }

    /// The board's name of the device.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// Runs `f` on the device.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut SpiDeviceBox) -> T) -> T {
        f(&mut lock(&self.inner))
    }
}

impl std::fmt::Debug for GrantedSpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantedSpi")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

/// An I2C bus granted to a workload, with the target addresses it may use.
pub struct GrantedI2c {
    bus: String,
    addresses: Vec<u16>,
    inner: Mutex<I2cBusBox>,
}

impl GrantedI2c {
    /// Wraps the I2C bus `bus` (`i2c-1`, for messages); only `addresses` may be used.
    pub fn new(bus: impl Into<String>, addresses: Vec<u16>, inner: I2cBusBox) -> Self {
        Self {
            bus: bus.into(),
            addresses,
            inner: Mutex::new(inner),
        }
    }

    /// The board's name of the bus.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// Whether the grant allows `address`.
    pub fn allows(&self, address: u16) -> bool {
        self.addresses.contains(&address)
    }

    /// Runs `f` on the bus.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut I2cBusBox) -> T) -> T {
        f(&mut lock(&self.inner))
    }
}

impl std::fmt::Debug for GrantedI2c {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantedI2c")
            .field("bus", &self.bus)
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// A GPIO grant: one pin in one direction.
#[derive(Debug, Clone)]
pub enum GpioGrant {
    /// The pin is an output.
    Output(Arc<GrantedOutput>),
    /// The pin is an input.
    Input(Arc<GrantedInput>),
}

/// Every device handle one workload may use, by logical name. Empty means nothing is allowed.
///
/// Cheap to clone: handles are shared (the instances of one workload, old and new during a
/// hot reload, use the same pins).
#[derive(Debug, Clone, Default)]
pub struct DeviceGrants {
    gpio: BTreeMap<String, GpioGrant>,
    spi: BTreeMap<String, Arc<GrantedSpi>>,
    i2c: BTreeMap<String, Arc<GrantedI2c>>,
}

impl DeviceGrants {
    /// No grants: every device call is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants the output pin `pin` under the logical name `name`.
    pub fn add_output(&mut self, name: impl Into<String>, pin: Arc<GrantedOutput>) {
        self.gpio.insert(name.into(), GpioGrant::Output(pin));
    }

    /// Grants the input pin `pin` under the logical name `name`.
    pub fn add_input(&mut self, name: impl Into<String>, pin: Arc<GrantedInput>) {
        self.gpio.insert(name.into(), GpioGrant::Input(pin));
    }

    /// Grants the SPI device `device` under the logical name `name`.
    pub fn add_spi(&mut self, name: impl Into<String>, device: Arc<GrantedSpi>) {
        self.spi.insert(name.into(), device);
    }

    /// Grants the I2C bus `bus` under the logical name `name`.
    pub fn add_i2c(&mut self, name: impl Into<String>, bus: Arc<GrantedI2c>) {
        self.i2c.insert(name.into(), bus);
    }

    /// The GPIO grant named `name`.
    pub fn gpio(&self, name: &str) -> Option<&GpioGrant> {
        self.gpio.get(name)
    }

    /// The SPI grant named `name`.
    pub fn spi(&self, name: &str) -> Option<&Arc<GrantedSpi>> {
        self.spi.get(name)
    }

    /// The I2C grant named `name`.
    pub fn i2c(&self, name: &str) -> Option<&Arc<GrantedI2c>> {
        self.i2c.get(name)
    }

    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.gpio.is_empty() && self.spi.is_empty() && self.i2c.is_empty()
    }

    /// Drives every output to its safe level; returns the pins that failed, with why.
    pub fn set_safe_state(&self) -> Vec<(String, lichen_devices::Error)> {
        self.gpio
            .values()
            .filter_map(|grant| match grant {
                GpioGrant::Output(pin) => pin
                    .set_safe_state()
                    .err()
                    .map(|e| (pin.pin().to_owned(), e)),
                GpioGrant::Input(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lichen_devices::sim::SimBoard;
    use lichen_devices::{OutputConfig, SpiConfig};
    use wasmtime::component::Resource;

    use super::*;
    use crate::device_types::{
        GpioError, GpioHost, HostDigitalOutPin, HostI2cBus, HostSpiDevice, I2cError, I2cHost,
        I2cOperation, SpiError, SpiHost, SpiOperation,
    };
    use crate::{DeviceState, HostLimits, LogLevel, LogSink};

    struct NoLog;
    impl LogSink for NoLog {
        fn log(&self, _: &str, _: LogLevel, _: &str, _: &str) {}
    }

    fn state(devices: DeviceGrants) -> DeviceState {
        DeviceState::new(
            Arc::from("door"),
            Arc::new(BTreeMap::new()),
            Arc::default(),
            Arc::new(NoLog),
            HostLimits::default(),
        )
        .with_devices(Arc::new(devices))
    }

    fn granted(board: &SimBoard) -> DeviceGrants {
        let mut grants = DeviceGrants::new();
        let led = board
            .output("GPIO17", "door", &OutputConfig::default())
            .expect("pin");
        grants.add_output(
            "led",
            Arc::new(GrantedOutput::new("GPIO17", Level::Low, Box::new(led))),
        );
        let spi = board.spi("spi0.0", SpiConfig::default()).expect("spi");
        grants.add_spi("adc", Arc::new(GrantedSpi::new("spi0.0", Box::new(spi))));
        let i2c = board.i2c("i2c-1").expect("i2c");
        grants.add_i2c(
            "env",
            Arc::new(GrantedI2c::new("i2c-1", vec![0x48], Box::new(i2c))),
        );
        grants
    }

    /// A borrow of an owned handle, as the guest passes `self` to a method.
    fn borrow<T: 'static>(handle: &Resource<T>) -> Resource<T> {
        Resource::new_borrow(handle.rep())
    }

    #[test]
    fn granted_outputs_drive_the_line_and_return_to_the_safe_state_when_dropped() {
        let board = SimBoard::default_board().expect("sim");
        let mut host = state(granted(&board));
        let led = GpioHost::get_output(&mut host, "led".into()).expect("granted");
        HostDigitalOutPin::toggle(&mut host, borrow(&led)).expect("toggle");
        assert_eq!(board.chip().level("GPIO17").expect("line"), Level::High);
        assert!(HostDigitalOutPin::is_set_high(&mut host, borrow(&led)).expect("read back"));
        assert!(matches!(
            GpioHost::get_output(&mut host, "led".into()),
            Err(GpioError::AlreadyInUse(_))
        ));
        drop(host);
        assert_eq!(
            board.chip().level("GPIO17").expect("line"),
            Level::Low,
            "safe state once the last holder is gone"
        );
        assert_eq!(board.chip().consumer("GPIO17").expect("line"), None);
    }

    #[test]
    fn names_outside_the_grant_are_refused_not_trapped() {
        let board = SimBoard::default_board().expect("sim");
        let mut host = state(granted(&board));
        match GpioHost::get_output(&mut host, "button".into()) {
            Err(GpioError::PinNotAllowed(why)) => assert_eq!(
                why,
                "no output pin named \"button\" is granted to workload \"door\""
            ),
            other => panic!("expected pin-not-allowed, got {other:?}"),
        }
        // An output is not an input.
        assert!(matches!(
            GpioHost::get_input(&mut host, "led".into()),
            Err(GpioError::PinNotAllowed(_))
        ));
        assert!(matches!(
            SpiHost::open(&mut host, "flash".into()),
            Err(SpiError::DeviceNotAllowed(_))
        ));
        assert!(matches!(
            I2cHost::open(&mut host, "eeprom".into()),
            Err(I2cError::BusNotAllowed(_))
        ));
        // No grants at all: nothing is allowed.
        let mut empty = state(DeviceGrants::new());
        assert!(matches!(
            GpioHost::get_output(&mut empty, "led".into()),
            Err(GpioError::PinNotAllowed(_))
        ));
    }

    #[test]
    fn i2c_checks_the_address_at_every_transaction() {
        let board = SimBoard::default_board().expect("sim");
        board
            .tmp102("i2c-1", 0x48)
            .expect("sensor")
            .set_celsius(21.5);
        let mut host = state(granted(&board));
        let bus = I2cHost::open(&mut host, "env".into()).expect("granted");
        let read = vec![I2cOperation::Write(vec![0x00]), I2cOperation::Read(2)];
        let bytes = HostI2cBus::transaction(&mut host, borrow(&bus), 0x48, read.clone())
            .expect("granted address");
        assert_eq!(
            lichen_devices::sim::Tmp102::decode([bytes[0][0], bytes[0][1]]),
            21.5
        );
        assert!(matches!(
            HostI2cBus::transaction(&mut host, borrow(&bus), 0x49, read),
            Err(I2cError::AddressNotAllowed(0x49))
        ));
    }

    #[test]
    fn spi_transactions_return_what_was_clocked_in() {
        let board = SimBoard::default_board().expect("sim");
        board
            .mcp3008("spi0.0")
            .expect("adc")
            .set_channel(0, 777)
            .expect("channel");
        let mut host = state(granted(&board));
        let adc = SpiHost::open(&mut host, "adc".into()).expect("granted");
        let rx = HostSpiDevice::transaction(
            &mut host,
            borrow(&adc),
            vec![
                SpiOperation::DelayNs(10),
                SpiOperation::Transfer(vec![0x01, 0x80, 0x00]),
            ],
        )
        .expect("transfer");
        assert_eq!(rx.len(), 1);
        assert_eq!(u16::from(rx[0][1] & 0x03) << 8 | u16::from(rx[0][2]), 777);
        let too_big =
            HostSpiDevice::transaction(&mut host, borrow(&adc), vec![SpiOperation::Read(1 << 20)]);
        assert!(matches!(too_big, Err(SpiError::Bus(_))));
    }
}
