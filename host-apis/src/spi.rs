//! `lichen:device/spi`: SPI devices opened by logical name, checked against the workload's
//! grants at every call.

use embedded_hal::spi::Operation as HalOperation;
use wasmtime::component::Resource;

use crate::DeviceState;
use crate::bindings::lichen::device::spi::{Error, Host, HostSpiDevice, Operation};

/// Most bytes one transaction may move (reads plus writes), so a guest cannot make the host
/// allocate without bound.
pub const MAX_TRANSACTION_BYTES: usize = 64 * 1024;

/// An SPI device as a guest holds it: the logical name, looked up again at every call.
#[derive(Debug, Clone)]
pub struct SpiDevice {
    name: String,
}

fn open_key(name: &str) -> String {
    format!("spi:{name}")
}

impl DeviceState {
    fn spi_grant(&self, name: &str) -> Result<std::sync::Arc<crate::GrantedSpi>, Error> {
        self.devices.spi(name).cloned().ok_or_else(|| {
            Error::DeviceNotAllowed(format!(
                "no SPI device named \"{name}\" is granted to workload \"{}\"",
                &*self.workload
            ))
        })
    }
}

impl Host for DeviceState {
    fn open(&mut self, name: String) -> Result<Resource<SpiDevice>, Error> {
        self.spi_grant(&name)?;
        if !self.open_devices.insert(open_key(&name)) {
            return Err(Error::AlreadyInUse(format!(
                "SPI device \"{name}\" is already open in this instance"
            )));
        }
        self.table
            .push(SpiDevice { name })
            .map_err(|e| Error::Bus(format!("cannot open SPI device: {e}")))
    }
}

impl HostSpiDevice for DeviceState {
    fn transaction(
        &mut self,
        device: Resource<SpiDevice>,
        operations: Vec<Operation>,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let name = self
            .table
            .get(&device)
            .map(|d| d.name.clone())
            .map_err(|e| Error::Bus(format!("bad SPI handle: {e}")))?;
        let grant = self.spi_grant(&name)?;
        let total: usize = operations
            .iter()
            .map(|op| match op {
                Operation::Read(len) => usize::try_from(*len).unwrap_or(usize::MAX),
                Operation::Write(bytes) => bytes.len(),
                Operation::Transfer(bytes) => bytes.len().saturating_mul(2),
                Operation::DelayNs(_) => 0,
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
                Operation::Transfer(bytes) => Some(vec![0; bytes.len()]),
                Operation::Write(_) | Operation::DelayNs(_) => None,
            })
            .collect();
        {
            let mut buffers = reads.iter_mut();
            let mut hal: Vec<HalOperation<'_, u8>> = Vec::with_capacity(operations.len());
            for op in &operations {
                hal.push(match op {
                    Operation::Read(_) => HalOperation::Read(
                        buffers.next().expect("one read buffer per read operation"),
                    ),
                    Operation::Write(bytes) => HalOperation::Write(bytes),
                    Operation::Transfer(bytes) => HalOperation::Transfer(
                        buffers
                            .next()
                            .expect("one read buffer per transfer operation"),
                        bytes,
                    ),
                    Operation::DelayNs(ns) => HalOperation::DelayNs(*ns),
                });
            }
            grant
                .with(|spi| spi.transaction(&mut hal))
                .map_err(|e| Error::Bus(crate::devices::naming(grant.bus(), &e)))?;
        }
        Ok(reads)
    }

    fn drop(&mut self, device: Resource<SpiDevice>) -> wasmtime::Result<()> {
        let device = self.table.delete(device)?;
        self.open_devices.remove(&open_key(&device.name));
        Ok(())
    }
}
