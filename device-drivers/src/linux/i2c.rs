//! I2C over i2c-dev (`/dev/i2c-N`): `I2C_RDWR` transactions, or SMBus operations on adapters
//! that can do only SMBus (i2c-stub, many PC SMBus controllers).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use embedded_hal::i2c::{ErrorType, I2c, Operation, SevenBitAddress, TenBitAddress};
use i2cdev::core::{I2CDevice, I2CMessage, I2CTransfer};
use i2cdev::linux::{I2CMessageFlags, LinuxI2CBus, LinuxI2CDevice, LinuxI2CError, LinuxI2CMessage};

use crate::{Error, Result};

/// An i2c-dev bus, an embedded-hal [`I2c`] for 7- and 10-bit addresses.
///
/// On an adapter with plain I2C (`I2C_FUNC_I2C`), each transaction is one `I2C_RDWR` ioctl.
/// Adjacent operations of one kind are merged into one message, as embedded-hal's contract
/// asks (no repeated start between them); that also keeps to adapters without
/// `I2C_M_NOSTART`. On an SMBus-only adapter, a transaction that has the same bytes on the
/// wire as one SMBus operation (a register write, a register read, a byte, a quick write) runs
/// as that operation; any other is refused with an error saying so.
#[derive(Debug)]
pub struct LinuxI2cBus {
    bus: LinuxI2CBus,
    path: PathBuf,
    /// The adapter's `I2C_FUNC_*` bits.
    funcs: u32,
    /// A second handle for SMBus operations (they need `I2C_SLAVE`), opened at first use.
    smbus: Option<LinuxI2CDevice>,
}

impl LinuxI2cBus {
    /// Open the bus at `path` (`/dev/i2c-1`) and ask the adapter what it can do.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bus = LinuxI2CBus::new(&path).map_err(|e| i2c_error(&path, None, e))?;
        let funcs = adapter_functions(&bus).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(LinuxI2cBus {
            bus,
            path,
            funcs,
            smbus: None,
        })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the adapter does plain I2C transfers (`I2C_FUNC_I2C`); without them,
    /// transactions go through SMBus operations.
    pub fn plain_i2c(&self) -> bool {
        self.funcs & I2C_FUNC_I2C != 0
    }

    fn run(&mut self, address: u16, ten_bit: bool, ops: &mut [Operation<'_>]) -> Result<()> {
        if !self.plain_i2c() {
            return self.run_smbus(address, ten_bit, ops);
        }
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

    /// Runs a transaction as one SMBus operation (see [`plan_smbus`]).
    fn run_smbus(&mut self, address: u16, ten_bit: bool, ops: &mut [Operation<'_>]) -> Result<()> {
        let bus = self.path.display().to_string();
        if ten_bit {
            return Err(Error::Bus {
                bus,
                message: format!(
                    "10-bit address {address:#x}: the adapter can do only SMBus, which has 7-bit addresses"
                ),
            });
        }
        let shape: Vec<Part> = ops
            .iter()
            .map(|op| match op {
                Operation::Write(w) => Part::Write(w),
                Operation::Read(r) => Part::Read(r.len()),
            })
            .collect();
        let plan = plan_smbus(&shape, self.funcs).map_err(|message| Error::Bus {
            bus: bus.clone(),
            message: format!("{message}: the adapter can do only SMBus, not plain I2C transfers"),
        })?;
        let device = match &mut self.smbus {
            Some(device) => {
                device
                    .set_slave_address(address)
                    .map_err(|e| i2c_error(&self.path, Some(address), e))?;
                device
            }
            None => self.smbus.insert(
                LinuxI2CDevice::new(&self.path, address)
                    .map_err(|e| i2c_error(&self.path, Some(address), e))?,
            ),
        };
        let read = match plan {
            Smbus::Quick => device.smbus_write_quick(false).map(|()| Vec::new()),
            Smbus::WriteByte(b) => device.smbus_write_byte(b).map(|()| Vec::new()),
            Smbus::WriteByteData(reg, v) => {
                device.smbus_write_byte_data(reg, v).map(|()| Vec::new())
            }
            Smbus::WriteWordData(reg, v) => {
                device.smbus_write_word_data(reg, v).map(|()| Vec::new())
            }
            Smbus::WriteI2cBlock(reg, data) => device
                .smbus_write_i2c_block_data(reg, &data)
                .map(|()| Vec::new()),
            Smbus::ReadByte => device.smbus_read_byte().map(|b| vec![b]),
            Smbus::ReadByteData(reg) => device.smbus_read_byte_data(reg).map(|b| vec![b]),
            // SMBus words travel low byte first: the first byte read is the low one.
            Smbus::ReadWordData(reg) => device
                .smbus_read_word_data(reg)
                .map(|w| w.to_le_bytes().to_vec()),
            Smbus::ReadI2cBlock(reg, len) => device.smbus_read_i2c_block_data(reg, len),
        }
        .map_err(|e| i2c_error(&self.path, Some(address), e))?;
        let wanted: usize = ops
            .iter()
            .map(|op| match op {
                Operation::Read(r) => r.len(),
                Operation::Write(_) => 0,
            })
            .sum();
        if read.len() != wanted {
            return Err(Error::Bus {
                bus,
                message: format!(
                    "address {address:#04x}: SMBus read returned {} bytes, {wanted} asked for",
                    read.len()
                ),
            });
        }
        let mut at = 0;
        for op in ops.iter_mut() {
            if let Operation::Read(r) = op {
                r.copy_from_slice(&read[at..at + r.len()]);
                at += r.len();
            }
        }
        Ok(())
    }
}

/// `I2C_FUNCS`: asks the adapter for its `I2C_FUNC_*` bits (linux/i2c-dev.h).
const I2C_FUNCS: libc::c_ulong = 0x0705;
/// Plain I2C transfers (`I2C_RDWR`).
const I2C_FUNC_I2C: u32 = 0x0000_0001;
const I2C_FUNC_SMBUS_QUICK: u32 = 0x0001_0000;
const I2C_FUNC_SMBUS_READ_BYTE: u32 = 0x0002_0000;
const I2C_FUNC_SMBUS_WRITE_BYTE: u32 = 0x0004_0000;
const I2C_FUNC_SMBUS_READ_BYTE_DATA: u32 = 0x0008_0000;
const I2C_FUNC_SMBUS_WRITE_BYTE_DATA: u32 = 0x0010_0000;
const I2C_FUNC_SMBUS_READ_WORD_DATA: u32 = 0x0020_0000;
const I2C_FUNC_SMBUS_WRITE_WORD_DATA: u32 = 0x0040_0000;
const I2C_FUNC_SMBUS_READ_I2C_BLOCK: u32 = 0x0400_0000;
const I2C_FUNC_SMBUS_WRITE_I2C_BLOCK: u32 = 0x0800_0000;
/// Longest SMBus block (`I2C_SMBUS_BLOCK_MAX`).
const SMBUS_BLOCK_MAX: usize = 32;

/// The adapter's functionality bits, from the `I2C_FUNCS` ioctl.
#[allow(unsafe_code)]
fn adapter_functions(bus: &LinuxI2CBus) -> std::io::Result<u32> {
    let mut funcs: libc::c_ulong = 0;
    // SAFETY: I2C_FUNCS writes one `unsigned long` through the pointer, which points at
    // `funcs`, a live local of that type; the descriptor is the open i2c-dev node `bus` owns.
    let rc = unsafe {
        libc::ioctl(
            bus.as_raw_fd(),
            I2C_FUNCS as _,
            &mut funcs as *mut libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The bits all sit in the low 32 (linux/i2c.h).
    Ok((funcs & 0xffff_ffff) as u32)
}

/// One operation of a transaction, as far as planning needs it.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    Write(&'a [u8]),
    Read(usize),
}

/// The SMBus operation with the same bytes on the wire as a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Smbus {
    Quick,
    WriteByte(u8),
    WriteByteData(u8, u8),
    WriteWordData(u8, u16),
    WriteI2cBlock(u8, Vec<u8>),
    ReadByte,
    ReadByteData(u8),
    ReadWordData(u8),
    ReadI2cBlock(u8, u8),
}

/// Why a transaction has no SMBus form on an adapter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NoSmbusForm {
    /// The adapter lacks the operation it needs.
    #[error("the adapter lacks SMBus {0}")]
    Lacks(&'static str),
    /// No messages.
    #[error("an empty transaction has no SMBus form")]
    Empty,
    /// A write longer than a block.
    #[error("a write of {0} bytes is longer than an SMBus block (1 + {SMBUS_BLOCK_MAX})")]
    WriteTooLong(usize),
    /// A read of nothing.
    #[error("a read of no bytes has no SMBus form")]
    EmptyRead,
    /// A read of several bytes with no register first.
    #[error("a read of {0} bytes without a register write first has no SMBus form")]
    ReadWithoutRegister(usize),
    /// A read longer than a block.
    #[error("a read of {0} bytes is longer than an SMBus block ({SMBUS_BLOCK_MAX})")]
    ReadTooLong(usize),
    /// More than one register byte before a read.
    #[error("a write of {0} bytes before a read has no SMBus form (one register byte only)")]
    LongRegister(usize),
    /// Too many messages.
    #[error("a transaction of {0} messages has no SMBus form")]
    TooManyMessages(usize),
}

/// Maps a transaction onto the one SMBus operation that puts the same bytes on the wire, given
/// the adapter's functionality bits `funcs`; the error says why none fits.
///
/// Adjacent writes (and adjacent reads) are one message, as on a plain I2C adapter. Then:
/// an empty write is a quick write; a write of one byte is "send byte", of two "write byte
/// data", of more an I2C-block write (word data for three bytes when I2C blocks are missing);
/// a one-byte read alone is "receive byte"; a one-byte write followed by a read of N bytes is
/// an I2C-block read of N (byte or word data for 1 or 2 when I2C blocks are missing).
fn plan_smbus(parts: &[Part<'_>], funcs: u32) -> std::result::Result<Smbus, NoSmbusForm> {
    // Merge adjacent parts of one kind.
    let mut writes: Vec<Vec<u8>> = Vec::new();
    let mut kinds: Vec<Option<usize>> = Vec::new(); // None: a write (index into writes); Some(n): a read of n
    for part in parts {
        match (part, kinds.last_mut()) {
            (Part::Write(w), Some(None)) => writes
                .last_mut()
                .expect("a write kind has its buffer")
                .extend_from_slice(w),
            (Part::Write(w), _) => {
                writes.push(w.to_vec());
                kinds.push(None);
            }
            (Part::Read(n), Some(Some(total))) => *total += n,
            (Part::Read(n), _) => kinds.push(Some(*n)),
        }
    }
    let has = |bits: u32| funcs & bits == bits;
    let need = |bits: u32, what: &'static str, op: Smbus| {
        if has(bits) {
            Ok(op)
        } else {
            Err(NoSmbusForm::Lacks(what))
        }
    };
    match (kinds.as_slice(), writes.as_slice()) {
        ([], _) => Err(NoSmbusForm::Empty),
        ([None], [w]) => match w.as_slice() {
            [] => need(I2C_FUNC_SMBUS_QUICK, "quick", Smbus::Quick),
            [b] => need(I2C_FUNC_SMBUS_WRITE_BYTE, "send byte", Smbus::WriteByte(*b)),
            [reg, v] => need(
                I2C_FUNC_SMBUS_WRITE_BYTE_DATA,
                "write byte data",
                Smbus::WriteByteData(*reg, *v),
            ),
            [reg, data @ ..] if data.len() <= SMBUS_BLOCK_MAX => {
                if has(I2C_FUNC_SMBUS_WRITE_I2C_BLOCK) {
                    Ok(Smbus::WriteI2cBlock(*reg, data.to_vec()))
                } else if let [lo, hi] = data {
                    need(
                        I2C_FUNC_SMBUS_WRITE_WORD_DATA,
                        "write word data or I2C block write",
                        Smbus::WriteWordData(*reg, u16::from_le_bytes([*lo, *hi])),
                    )
                } else {
                    Err(NoSmbusForm::Lacks("I2C block write"))
                }
            }
            _ => Err(NoSmbusForm::WriteTooLong(w.len())),
        },
        ([Some(0)], _) => Err(NoSmbusForm::EmptyRead),
        ([Some(1)], _) => need(I2C_FUNC_SMBUS_READ_BYTE, "receive byte", Smbus::ReadByte),
        ([Some(n)], _) => Err(NoSmbusForm::ReadWithoutRegister(*n)),
        ([None, Some(n)], [w]) => match (w.as_slice(), *n) {
            ([_], 0) => Err(NoSmbusForm::EmptyRead),
            ([reg], n) if n <= SMBUS_BLOCK_MAX && has(I2C_FUNC_SMBUS_READ_I2C_BLOCK) => {
                let n = u8::try_from(n).expect("at most SMBUS_BLOCK_MAX (32) by the guard");
                Ok(Smbus::ReadI2cBlock(*reg, n))
            }
            ([reg], 1) => need(
                I2C_FUNC_SMBUS_READ_BYTE_DATA,
                "read byte data",
                Smbus::ReadByteData(*reg),
            ),
            ([reg], 2) => need(
                I2C_FUNC_SMBUS_READ_WORD_DATA,
                "read word data or I2C block read",
                Smbus::ReadWordData(*reg),
            ),
            ([_], n) if n <= SMBUS_BLOCK_MAX => Err(NoSmbusForm::Lacks("I2C block read")),
            ([_], n) => Err(NoSmbusForm::ReadTooLong(n)),
            (w, _) => Err(NoSmbusForm::LongRegister(w.len())),
        },
        (kinds, _) => Err(NoSmbusForm::TooManyMessages(kinds.len())),
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

    /// Every SMBus function i2c-stub offers (its default functionality).
    const STUB: u32 = I2C_FUNC_SMBUS_QUICK
        | I2C_FUNC_SMBUS_READ_BYTE
        | I2C_FUNC_SMBUS_WRITE_BYTE
        | I2C_FUNC_SMBUS_READ_BYTE_DATA
        | I2C_FUNC_SMBUS_WRITE_BYTE_DATA
        | I2C_FUNC_SMBUS_READ_WORD_DATA
        | I2C_FUNC_SMBUS_WRITE_WORD_DATA
        | I2C_FUNC_SMBUS_READ_I2C_BLOCK
        | I2C_FUNC_SMBUS_WRITE_I2C_BLOCK;
    /// Byte and word data only, no I2C blocks (many PC SMBus controllers).
    const NO_BLOCKS: u32 = STUB & !(I2C_FUNC_SMBUS_READ_I2C_BLOCK | I2C_FUNC_SMBUS_WRITE_I2C_BLOCK);

    #[test]
    fn register_reads_and_writes_map_to_the_smbus_operation_with_the_same_wire_bytes() {
        use Part::{Read, Write};
        // TMP102: point at the temperature register, read two bytes.
        assert_eq!(
            plan_smbus(&[Write(&[0x00]), Read(2)], STUB),
            Ok(Smbus::ReadI2cBlock(0x00, 2))
        );
        assert_eq!(
            plan_smbus(&[Write(&[0x00]), Read(2)], NO_BLOCKS),
            Ok(Smbus::ReadWordData(0x00))
        );
        assert_eq!(
            plan_smbus(&[Write(&[0x01]), Read(1)], NO_BLOCKS),
            Ok(Smbus::ReadByteData(0x01))
        );
        assert_eq!(
            plan_smbus(&[Write(&[0x01]), Read(1), Read(2)], STUB),
            Ok(Smbus::ReadI2cBlock(0x01, 3)),
            "adjacent reads are one message"
        );
        assert_eq!(plan_smbus(&[Write(&[])], STUB), Ok(Smbus::Quick));
        assert_eq!(plan_smbus(&[Write(&[0x7])], STUB), Ok(Smbus::WriteByte(7)));
        assert_eq!(
            plan_smbus(&[Write(&[0x01]), Write(&[0x60])], STUB),
            Ok(Smbus::WriteByteData(0x01, 0x60)),
            "adjacent writes are one message"
        );
        assert_eq!(
            plan_smbus(&[Write(&[0x02, 0x4b, 0x00])], STUB),
            Ok(Smbus::WriteI2cBlock(0x02, vec![0x4b, 0x00]))
        );
        assert_eq!(
            plan_smbus(&[Write(&[0x02, 0x4b, 0x00])], NO_BLOCKS),
            Ok(Smbus::WriteWordData(0x02, 0x004b))
        );
        assert_eq!(plan_smbus(&[Read(1)], STUB), Ok(Smbus::ReadByte));
    }

    /// The plan, its refusal in words.
    fn plan_text(parts: &[Part<'_>], funcs: u32) -> Result<Smbus, String> {
        plan_smbus(parts, funcs).map_err(|e| e.to_string())
    }

    #[test]
    fn transactions_without_an_smbus_form_are_refused_saying_why() {
        use Part::{Read, Write};
        assert_eq!(
            plan_text(&[Read(2)], STUB),
            Err("a read of 2 bytes without a register write first has no SMBus form".into())
        );
        assert_eq!(
            plan_text(&[Write(&[1]), Read(1), Write(&[2]), Read(1)], STUB),
            Err("a transaction of 4 messages has no SMBus form".into())
        );
        assert_eq!(
            plan_text(&[Write(&[0x00]), Read(33)], STUB),
            Err("a read of 33 bytes is longer than an SMBus block (32)".into())
        );
        assert_eq!(
            plan_text(&[Write(&[0x00, 0x01]), Read(1)], STUB),
            Err(
                "a write of 2 bytes before a read has no SMBus form (one register byte only)"
                    .into()
            )
        );
        assert_eq!(
            plan_text(&[Write(&[0x00]), Read(4)], NO_BLOCKS),
            Err("the adapter lacks SMBus I2C block read".into())
        );
        assert_eq!(
            plan_text(&[Write(&[0x00]), Read(2)], I2C_FUNC_SMBUS_READ_BYTE_DATA),
            Err("the adapter lacks SMBus read word data or I2C block read".into())
        );
        assert_eq!(
            plan_text(&[Write(&[])], NO_BLOCKS & !I2C_FUNC_SMBUS_QUICK),
            Err("the adapter lacks SMBus quick".into())
        );
        assert_eq!(
            plan_text(&[], STUB),
            Err("an empty transaction has no SMBus form".into())
        );
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
