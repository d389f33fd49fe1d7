//! Lichen's host APIs: the WIT world that device functions target and its Wasmtime host
//! implementation.
//!
//! The world (`host-apis/wit/world.wit`, `lichen:device/device-function@0.1.0`) exports
//! `init` and `on-event` and imports the standard WASI 0.2 interfaces `wasi:logging`,
//! `wasi:config/store`, `wasi:keyvalue/store` + `atomics` and clocks, plus
//! `lichen:device/telemetry`. Each import is served from a [`DeviceState`] bound to one
//! workload: its configuration, its key-value data, its log and its telemetry streams.
//!
//! Device access (`lichen:device/gpio`, `spi`, `i2c`, in `wit/devices.wit`) goes through the
//! [`DeviceGrants`] the embedder opened for the workload from its deployment's grants
//! ([`DeviceState::with_devices`]): guests ask by logical name, every call is checked against
//! the grants, and a name that is not granted gets `pin-not-allowed` (or the SPI/I2C
//! equivalent) rather than a trap. Without grants nothing is allowed.
//!
//! Writes are transactional per call into the guest: key-value writes and telemetry records
//! accumulate in [`DeviceState`] while the guest runs, and the embedder either takes them with
//! [`DeviceState::take_pending`] (to commit them durably, then publish them with
//! [`DeviceState::apply_committed`]) or drops them with [`DeviceState::discard_pending`] when
//! the guest trapped.
//!
//! ```no_run
//! use lichen_host_apis::{add_to_linker, DeviceState};
//! use wasmtime::component::Linker;
//!
//! struct Data { device: DeviceState }
//! fn link(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<Data>> {
//!     let mut linker = Linker::new(engine);
//!     add_to_linker(&mut linker, |d: &mut Data| &mut d.device)?;
//!     Ok(linker)
//! }
//! ```

mod config;
mod devices;
mod gpio;
mod i2c;
mod keyvalue;
mod logging;
mod spi;
mod state;
mod telemetry;

pub use devices::{
    DeviceGrants, EdgeInput, GpioGrant, GrantedI2c, GrantedInput, GrantedOutput, GrantedSpi,
    I2cBusBox, InputPinBox, OutputPinBox, SpiDeviceBox,
};
pub use gpio::{DigitalInPin, DigitalOutPin};
pub use i2c::I2cBus;
pub use spi::SpiDevice;

pub use keyvalue::{Bucket, KvKey, KvMap};
pub use logging::{LogLevel, LogSink};
pub use state::{DeviceState, HostLimits, PendingWrites, TelemetryRecord};

use wasmtime::component::{HasSelf, Linker};

/// Bindings generated from the WIT world.
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "lichen:device/device-function",
        exports: { default: async },
        with: {
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            "wasi:keyvalue/store.bucket": crate::keyvalue::Bucket,
            "lichen:device/gpio.digital-out-pin": crate::gpio::DigitalOutPin,
            "lichen:device/gpio.digital-in-pin": crate::gpio::DigitalInPin,
            "lichen:device/spi.spi-device": crate::spi::SpiDevice,
            "lichen:device/i2c.i2c-bus": crate::i2c::I2cBus,
        },
    });
}

pub use bindings::lichen::device::types::{Command, Edge, Event, GpioEdge, Tick};

/// The interfaces of Lichen's world that reach hardware and so need the workload's grants
/// (`gpio`, `spi`, `i2c` in `wit/devices.wit`), as a component names its imports, without
/// version.
pub const DEVICE_INTERFACES: [&str; 3] = [
    "lichen:device/gpio",
    "lichen:device/spi",
    "lichen:device/i2c",
];

/// The WIT types of `lichen:device/gpio`, `spi` and `i2c`, for embedders and tests that call
/// the host implementations directly.
pub mod device_types {
    pub use crate::bindings::lichen::device::gpio::{
        Error as GpioError, Host as GpioHost, HostDigitalInPin, HostDigitalOutPin, Level,
    };
    pub use crate::bindings::lichen::device::i2c::{
        Error as I2cError, Host as I2cHost, HostI2cBus, Operation as I2cOperation,
    };
    pub use crate::bindings::lichen::device::spi::{
        Error as SpiError, Host as SpiHost, HostSpiDevice, Operation as SpiOperation,
    };
}
/// The host traits and WIT types of the other imports (`wasi:keyvalue`, `wasi:logging`,
/// `wasi:config`, `lichen:device/telemetry`), for tests and fuzzers that call the host
/// implementations directly, as a guest would, without a Wasm engine.
pub mod host_types {
    pub use crate::bindings::lichen::device::telemetry::{
        Error as TelemetryError, Host as TelemetryHost,
    };
    pub use crate::bindings::wasi::config::store::{Error as ConfigError, Host as ConfigHost};
    pub use crate::bindings::wasi::keyvalue::atomics::Host as AtomicsHost;
    pub use crate::bindings::wasi::keyvalue::store::{
        Error as KeyValueError, Host as KeyValueHost, HostBucket, KeyResponse,
    };
    pub use crate::bindings::wasi::logging::logging::{Host as LoggingHost, Level as WitLogLevel};
}
pub use bindings::{DeviceFunction, DeviceFunctionPre};

/// Fully qualified name of the world device functions must target.
pub const WORLD: &str = "lichen:device/device-function@0.1.0";

/// Adds Lichen's own imports (logging, config, key-value, telemetry, gpio, spi, i2c) to
/// `linker`.
///
/// The clocks and the rest of WASI 0.2 come from `wasmtime_wasi::p2::add_to_linker_async`,
/// which the embedder adds beside these.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut DeviceState,
) -> wasmtime::Result<()> {
    use bindings::{lichen, wasi};
    wasi::logging::logging::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    wasi::config::store::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    wasi::keyvalue::store::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    wasi::keyvalue::atomics::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    lichen::device::types::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    lichen::device::telemetry::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    lichen::device::gpio::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    lichen::device::spi::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    lichen::device::i2c::add_to_linker::<T, HasSelf<DeviceState>>(linker, get)?;
    Ok(())
}

#[cfg(test)]
mod device_interface_tests {
    /// The list names exactly the interfaces `wit/devices.wit` declares, so a new device
    /// interface cannot be added to the world without being counted as one that needs grants.
    #[test]
    fn device_interfaces_are_the_ones_devices_wit_declares() {
        let wit = include_str!("../wit/devices.wit");
        let package = wit
            .lines()
            .find_map(|line| line.strip_prefix("package "))
            .and_then(|rest| rest.split('@').next())
            .expect("devices.wit names its package");
        let declared: Vec<String> = wit
            .lines()
            .filter_map(|line| line.strip_prefix("interface "))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(|name| format!("{package}/{name}"))
            .collect();
        assert_eq!(declared, super::DEVICE_INTERFACES);
    }
}
