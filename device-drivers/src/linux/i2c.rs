//! I2C over i2c-dev (`/dev/i2c-N`), with `I2C_RDWR` transactions.

use std::path::{Path, PathBuf};

use embedded_hal::i2c::{ErrorType, I2c, Operation, SevenBitAddress, TenBitAddress};
use i2cdev::core::{I2CMessage, I2CTransfer};
use i2cdev::linux::{I2CMessageFlags, LinuxI2CBus, LinuxI2CError, LinuxI2CMessage};

use crate::{Error, Result};

/// An i2c-dev bus, an embedded-hal [`I2c`] for 7- and 10-bit addresses.
///
/// Each transaction is one `I2C_RDWR` ioctl. Adjacent operations of one kind are merged into
/// one message, as embedded-hal's contract asks (no repeated start between them); that also
/// keeps to adapters without `I2C_M_NOSTART`.
#[derive(Debug)]
pub struct LinuxI2cBus {
    bus: LinuxI2CBus,
    path: PathBuf,
}

impl LinuxI2cBus {
    /// Open the bus at `path` (`/dev/i2c-1`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bus = LinuxI2CBus::new(&path).map_err(|e| i2c_error(&path, None, e))?;
        Ok(LinuxI2cBus { bus, path })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn run(&mut self, address: u16, ten_bit: bool, ops: &mut [Operation<'_>]) -> Result<()> {
        // Segments: (is_read, first op, end op).
        let mut segments = Vec::new();
        let mut i = 0;
        while i < ops.len() {
            let is_read = matches!(ops[i], Operation::Read(_));
            let end = ops[i..]
                .iter()
                .position(|op| matches!(op, Operation::Read(_)) != is_read)
                .map_or(ops.len(), |n| i + n);
            segments.push((is_read, i, end));
            i = end;
        }
        let mut buffers: Vec<Vec<u8>> = segments
            .iter()
            .map(|&(is_read, start, end)| {
                let mut buf = Vec::new();
                for op in &ops[start..end] {
                    match op {
                        Operation::Write(w) if !is_read => buf.extend_from_slice(w),
                        Operation::Read(r) if is_read => buf.resize(buf.len() + r.len(), 0),
                        _ => {}
                    }
                }
                buf
            })
            .collect();
        for buf in &buffers {
            if buf.len() > usize::from(u16::MAX) {
                return Err(Error::Bus {
                    bus: self.path.display().to_string(),
                    message: format!("{} bytes is too long for one I2C message", buf.len()),
                });
            }
        }
        {
            // `I2CMessageFlags` is not `Copy`: rebuild it per message.
            let flag = || {
                if ten_bit {
                    I2CMessageFlags::TEN_BIT_ADDRESS
                } else {
                    I2CMessageFlags::empty()
                }
            };
            let mut msgs: Vec<LinuxI2CMessage<'_>> = segments
                .iter()
                .zip(buffers.iter_mut())
                .map(|(&(is_read, _, _), buf)| {
                    if is_read {
                        LinuxI2CMessage::read(buf)
                            .with_address(address)
                            .with_flags(flag() | I2CMessageFlags::READ)
                    } else {
                        LinuxI2CMessage::write(buf)
                            .with_address(address)
                            .with_flags(flag())
                    }
                })
                .collect();
            self.bus
                .transfer(&mut msgs)
                .map_err(|e| i2c_error(&self.path, Some(address), e))?;
        }
        for (&(is_read, start, end), buf) in segments.iter().zip(&buffers) {
            if !is_read {
                continue;
            }
            let mut at = 0;
            for op in &mut ops[start..end] {
                if let Operation::Read(r) = op {
                    r.copy_from_slice(&buf[at..at + r.len()]);
                    at += r.len();
                }
            }
        }
        Ok(())
    }
}

const ENXIO: i32 = 6;
const EACCES: i32 = 13;
const EOPNOTSUPP: i32 = 95;
const EREMOTEIO: i32 = 121;

fn i2c_error(path: &Path, address: Option<u16>, e: LinuxI2CError) -> Error {
    let errno = match &e {
        LinuxI2CError::Errno(n) => Some(*n),
        LinuxI2CError::Io(io) => io.raw_os_error(),
    };
    let bus = path.display().to_string();
    match (errno, address) {
        (Some(ENXIO | EREMOTEIO), Some(address)) => Error::NoAcknowledge { bus, address },
        (Some(EOPNOTSUPP), _) => Error::Bus {
            bus,
            message: "the adapter cannot do plain I2C transfers (SMBus-only adapter)".into(),
        },
        (Some(EACCES), _) => Error::PermissionDenied {
            path: path.to_path_buf(),
        },
        _ => match e {
            LinuxI2CError::Io(io) => Error::from_io(path, io),
            LinuxI2CError::Errno(n) => Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(n),
            },
        },
    }
}

impl ErrorType for LinuxI2cBus {
    type Error = Error;
}

impl I2c<SevenBitAddress> for LinuxI2cBus {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<()> {
        self.run(u16::from(address), false, operations)
    }
}

impl I2c<TenBitAddress> for LinuxI2cBus {
    fn transaction(&mut self, address: u16, operations: &mut [Operation<'_>]) -> Result<()> {
        self.run(address, true, operations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_node_names_it() {
        let e = LinuxI2cBus::open("/dev/i2c-lichen-none").expect_err("no such node");
        assert_eq!(e.to_string(), "/dev/i2c-lichen-none: no such device node");
    }

    #[test]
    fn nack_errno_names_bus_and_address() {
        let e = i2c_error(
            Path::new("/dev/i2c-1"),
            Some(0x76),
            LinuxI2CError::Errno(ENXIO),
        );
        assert_eq!(
            e.to_string(),
            "/dev/i2c-1: no device acknowledged address 0x76"
        );
    }
}
