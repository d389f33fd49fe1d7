//! Lichen's host APIs: the WIT world that device functions target and its Wasmtime host
//! implementation.
//!
//! The world (`host-apis/wit/world.wit`, `lichen:device/device-function@0.1.0`) exports
//! `init` and `on-event` and imports the standard WASI 0.2 interfaces `wasi:logging`,
//! `wasi:config/store`, `wasi:keyvalue/store` + `atomics` and clocks, plus
//! `lichen:device/telemetry`. Each import is served from a [`DeviceState`] bound to one
//! workload: its configuration, its key-value data, its log and its telemetry streams.
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
mod keyvalue;
mod logging;
mod state;
mod telemetry;

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
        },
    });
}

pub use bindings::lichen::device::types::{Command, Event, Tick};
pub use bindings::{DeviceFunction, DeviceFunctionPre};

/// Fully qualified name of the world device functions must target.
pub const WORLD: &str = "lichen:device/device-function@0.1.0";

/// Adds Lichen's own imports (logging, config, key-value, telemetry) to `linker`.
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
    Ok(())
}
