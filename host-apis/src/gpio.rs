//! `lichen:device/gpio`: digital pins opened by logical name, checked against the workload's
//! grants at every call.

use wasmtime::component::Resource;

use crate::DeviceState;
use crate::bindings::lichen::device::gpio::{
    Error, Host, HostDigitalInPin, HostDigitalOutPin, Level,
};
use crate::devices::{GpioGrant, GrantedInput, GrantedOutput};

/// An output pin as a guest holds it: the logical name, looked up again at every call.
#[derive(Debug, Clone)]
pub struct DigitalOutPin {
    name: String,
}

/// An input pin as a guest holds it: the logical name, looked up again at every call.
#[derive(Debug, Clone)]
pub struct DigitalInPin {
    name: String,
}

/// Key of an open pin in [`DeviceState`]'s set of open devices.
fn open_key(name: &str) -> String {
    format!("gpio:{name}")
}

impl DeviceState {
    fn not_granted(&self, name: &str, direction: &str) -> Error {
        Error::PinNotAllowed(format!(
            "no {direction} pin named \"{name}\" is granted to workload \"{}\"",
            &*self.workload
        ))
    }

    /// The output grant `name`, checked now.
    fn output_grant(&self, name: &str) -> Result<std::sync::Arc<GrantedOutput>, Error> {
        match self.devices.gpio(name) {
            Some(GpioGrant::Output(pin)) => Ok(pin.clone()),
            _ => Err(self.not_granted(name, "output")),
        }
    }

    /// The input grant `name`, checked now.
    fn input_grant(&self, name: &str) -> Result<std::sync::Arc<GrantedInput>, Error> {
        match self.devices.gpio(name) {
            Some(GpioGrant::Input(pin)) => Ok(pin.clone()),
            _ => Err(self.not_granted(name, "input")),
        }
    }

    fn out_pin(
        &self,
        pin: &Resource<DigitalOutPin>,
    ) -> Result<std::sync::Arc<GrantedOutput>, Error> {
        let name = self
            .table
            .get(pin)
            .map(|p| p.name.clone())
            .map_err(|e| Error::Hardware(format!("bad pin handle: {e}")))?;
        self.output_grant(&name)
    }
}

fn hardware(pin: &str, error: lichen_devices::Error) -> Error {
    Error::Hardware(format!("pin {pin}: {error}"))
}

impl Host for DeviceState {
    fn get_output(&mut self, name: String) -> Result<Resource<DigitalOutPin>, Error> {
        self.output_grant(&name)?;
        if !self.open_devices.insert(open_key(&name)) {
            return Err(Error::AlreadyInUse(format!(
                "output pin \"{name}\" is already open in this instance"
            )));
        }
        self.table
            .push(DigitalOutPin { name })
            .map_err(|e| Error::Hardware(format!("cannot open pin: {e}")))
    }

    fn get_input(&mut self, name: String) -> Result<Resource<DigitalInPin>, Error> {
        self.input_grant(&name)?;
        if !self.open_devices.insert(open_key(&name)) {
            return Err(Error::AlreadyInUse(format!(
                "input pin \"{name}\" is already open in this instance"
            )));
        }
        self.table
            .push(DigitalInPin { name })
            .map_err(|e| Error::Hardware(format!("cannot open pin: {e}")))
    }
}

impl HostDigitalOutPin for DeviceState {
    fn set_level(&mut self, pin: Resource<DigitalOutPin>, level: Level) -> Result<(), Error> {
        let grant = self.out_pin(&pin)?;
        grant
            .with(|p| match level {
                Level::Low => p.set_low(),
                Level::High => p.set_high(),
            })
            .map_err(|e| hardware(grant.pin(), e))
    }

    fn toggle(&mut self, pin: Resource<DigitalOutPin>) -> Result<(), Error> {
        let grant = self.out_pin(&pin)?;
        grant
            .with(|p| p.toggle())
            .map_err(|e| hardware(grant.pin(), e))
    }

    fn is_set_high(&mut self, pin: Resource<DigitalOutPin>) -> Result<bool, Error> {
        let grant = self.out_pin(&pin)?;
        grant
            .with(|p| p.is_set_high())
            .map_err(|e| hardware(grant.pin(), e))
    }

    fn drop(&mut self, pin: Resource<DigitalOutPin>) -> wasmtime::Result<()> {
        let pin = self.table.delete(pin)?;
        self.open_devices.remove(&open_key(&pin.name));
        Ok(())
    }
}

impl HostDigitalInPin for DeviceState {
    fn read_level(&mut self, pin: Resource<DigitalInPin>) -> Result<Level, Error> {
        let name = self
            .table
            .get(&pin)
            .map(|p| p.name.clone())
            .map_err(|e| Error::Hardware(format!("bad pin handle: {e}")))?;
        let grant = self.input_grant(&name)?;
        let high = grant
            .with(|p| p.is_high())
            .map_err(|e| hardware(grant.pin(), e))?;
        Ok(if high { Level::High } else { Level::Low })
    }

    fn drop(&mut self, pin: Resource<DigitalInPin>) -> wasmtime::Result<()> {
        let pin = self.table.delete(pin)?;
        self.open_devices.remove(&open_key(&pin.name));
        Ok(())
    }
}
