//! SPI over spidev (`/dev/spidevB.C`).

use std::path::{Path, PathBuf};

use embedded_hal::spi::{ErrorType, Operation, SpiDevice};
use spidev::{SpiModeFlags, Spidev, SpidevOptions, SpidevTransfer};

use crate::{Error, Result, SpiConfig, SpiMode};

/// An spidev device, an embedded-hal [`SpiDevice`]: each transaction is one
/// `SPI_IOC_MESSAGE`, so chip-select is held across all its operations.
#[derive(Debug)]
pub struct LinuxSpiDevice {
    dev: Spidev,
    path: PathBuf,
    config: SpiConfig,
}

impl LinuxSpiDevice {
    /// Open `path` and set mode, clock and word size.
    pub fn open(path: impl AsRef<Path>, config: SpiConfig) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut dev = Spidev::open(&path).map_err(|e| Error::from_io(&path, e))?;
        let mode = match config.mode {
            SpiMode::Mode0 => SpiModeFlags::SPI_MODE_0,
            SpiMode::Mode1 => SpiModeFlags::SPI_MODE_1,
            SpiMode::Mode2 => SpiModeFlags::SPI_MODE_2,
            SpiMode::Mode3 => SpiModeFlags::SPI_MODE_3,
        };
        dev.configure(
            &SpidevOptions::new()
                .mode(mode)
                .max_speed_hz(config.max_hz)
                .bits_per_word(config.bits_per_word)
                .build(),
        )
        .map_err(|e| Error::from_io(&path, e))?;
        Ok(LinuxSpiDevice { dev, path, config })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> SpiConfig {
        self.config
    }
}

impl ErrorType for LinuxSpiDevice {
    type Error = Error;
}

impl SpiDevice<u8> for LinuxSpiDevice {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<()> {
        // spidev wants equal tx and rx lengths; embedded-hal allows a `Transfer` with unequal
        // ones (clock the longer, pad writes with 0x00, drop extra reads). Pad through scratch
        // buffers, made before the transfer list borrows anything.
        let mut scratch: Vec<Option<(Vec<u8>, Vec<u8>)>> = operations
            .iter()
            .map(|op| match op {
                Operation::Transfer(r, w) if r.len() != w.len() => {
                    let n = r.len().max(w.len());
                    let mut tx = w.to_vec();
                    tx.resize(n, 0);
                    Some((tx, vec![0u8; n]))
                }
                _ => None,
            })
            .collect();
        {
            let mut transfers = Vec::with_capacity(operations.len());
            for (op, pad) in operations.iter_mut().zip(scratch.iter_mut()) {
                let t = match (op, pad) {
                    (Operation::Transfer(_, _), Some((tx, rx))) => {
                        SpidevTransfer::read_write(tx, rx)
                    }
                    (Operation::Read(buf), _) => SpidevTransfer::read(buf),
                    (Operation::Write(buf), _) => SpidevTransfer::write(buf),
                    (Operation::Transfer(r, w), None) => SpidevTransfer::read_write(w, r),
                    (Operation::TransferInPlace(buf), _) => {
                        SpidevTransfer::read_write_in_place(buf)
                    }
                    (Operation::DelayNs(ns), _) => {
                        let us = ns.div_ceil(1000);
                        SpidevTransfer::delay(u16::try_from(us).unwrap_or(u16::MAX))
                    }
                };
                transfers.push(t);
            }
            self.dev
                .transfer_multiple(&mut transfers)
                .map_err(|e| Error::from_io(&self.path, e))?;
        }
        for (op, pad) in operations.iter_mut().zip(scratch) {
            if let (Operation::Transfer(r, _), Some((_, rx))) = (op, pad) {
                let n = r.len();
                r.copy_from_slice(&rx[..n]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_node_names_it() {
        let e = LinuxSpiDevice::open("/dev/spidev-lichen-none.0", SpiConfig::default())
            .expect_err("no such node");
        assert_eq!(
            e.to_string(),
            "/dev/spidev-lichen-none.0: no such device node"
        );
    }

    #[test]
    fn a_node_that_is_not_an_spidev_names_the_node() {
        // /dev/null opens, but the spidev ioctls fail on it (ENOTTY).
        let e = LinuxSpiDevice::open("/dev/null", SpiConfig::default()).expect_err("not spidev");
        assert!(e.to_string().starts_with("/dev/null: "), "{e}");
    }
}
