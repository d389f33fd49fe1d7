//! `lichen:device/i2c`: I2C buses opened by logical name; every transaction is checked
//! against the grant's addresses.

use embedded_hal::i2c::Operation as HalOperation;
use wasmtime::component::Resource;

use crate::DeviceState;
use crate::bindings::lichen::device::i2c::{Error, Host, HostI2cBus, Operation};

/// Most bytes one transaction may move, so a guest cannot make the host allocate without
/// bound.
pub const MAX_TRANSACTION_BYTES: usize = 64 * 1024;

/// An I2C bus as a guest holds it: the logical name, looked up again at every call.
#[derive(Debug, Clone)]
pub struct I2cBus {
    name: String,
}

fn open_key(name: &str) -> String {
    format!("i2c:{name}")
}

impl DeviceState {
    fn i2c_grant(&self, name: &str) -> Result<std::sync::Arc<crate::GrantedI2c>, Error> {
        self.devices.i2c(name).cloned().ok_or_else(|| {
            Error::BusNotAllowed(format!(
                "no I2C bus named \"{name}\" is granted to workload \"{}\"",
                &*self.workload
            ))
        })
    }
}

impl Host for DeviceState {
    fn open(&mut self, name: String) -> Result<Resource<I2cBus>, Error> {
        self.i2c_grant(&name)?;
        if !self.open_devices.insert(open_key(&name)) {
            return Err(Error::Bus(format!(
                "I2C bus \"{name}\" is already open in this instance"
            )));
        }
        self.table
            .push(I2cBus { name })
            .map_err(|e| Error::Bus(format!("cannot open I2C bus: {e}")))
    }
}

impl HostI2cBus for DeviceState {
    fn transaction(
        &mut self,
        bus: Resource<I2cBus>,
        address: u16,
        operations: Vec<Operation>,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let name = self
            .table
            .get(&bus)
            .map(|b| b.name.clone())
            .map_err(|e| Error::Bus(format!("bad I2C handle: {e}")))?;
        let grant = self.i2c_grant(&name)?;
        if !grant.allows(address) {
            return Err(Error::AddressNotAllowed(address));
        }
        // Grants hold 7-bit addresses only (the deployment check refuses others).
        let seven_bit = u8::try_from(address).map_err(|_| Error::AddressNotAllowed(address))?;
        let total: usize = operations
            .iter()
            .map(|op| match op {
                Operation::Read(len) => usize::try_from(*len).unwrap_or(usize::MAX),
                Operation::Write(bytes) => bytes.len(),
            })
            .fold(0usize, usize::saturating_add);
        if total > MAX_TRANSACTION_BYTES {
            return Err(Error::Bus(format!(
                "{}: a transaction of {total} bytes is larger than the {MAX_TRANSACTION_BYTES} allowed",
                grant.bus()
            )));
        }
        let mut reads: Vec<Vec<u8>> = operations
            .iter()
            .filter_map(|op| match op {
                Operation::Read(len) => Some(vec![0; usize::try_from(*len).unwrap_or(0)]),
                Operation::Write(_) => None,
            })
            .collect();
        {
            let mut buffers = reads.iter_mut();
            let mut hal: Vec<HalOperation<'_>> = Vec::with_capacity(operations.len());
            for op in &operations {
                hal.push(match op {
                    Operation::Read(_) => HalOperation::Read(
                        buffers.next().expect("one read buffer per read operation"),
                    ),
                    Operation::Write(bytes) => HalOperation::Write(bytes),
                });
            }
            grant
                .with(|i2c| i2c.transaction(seven_bit, &mut hal))
                .map_err(|e| match e {
                    lichen_devices::Error::NoAcknowledge { address, .. } => {
                        Error::NoAcknowledge(address)
                    }
                    other => Error::Bus(crate::devices::naming(grant.bus(), &other)),
                })?;
        }
        Ok(reads)
    }

    fn drop(&mut self, bus: Resource<I2cBus>) -> wasmtime::Result<()> {
        let bus = self.table.delete(bus)?;
        self.open_devices.remove(&open_key(&bus.name));
        Ok(())
    }
}
