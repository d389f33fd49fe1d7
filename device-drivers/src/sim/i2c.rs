//! A simulated I2C bus and a TMP102 temperature sensor model on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use embedded_hal::i2c::{ErrorType, I2c, Operation, SevenBitAddress, TenBitAddress};

use crate::{Error, Result};

/// A target on a simulated I2C bus.
///
/// The bus follows embedded-hal's transaction contract: adjacent operations of one kind form
/// one segment (no repeated start between them), so a target sees one `write` or `read` call
/// per segment, each one after a (repeated) start with its address.
pub trait I2cPeer: Send {
    /// Bytes written in one segment, in order.
    fn write(&mut self, data: &[u8]);
    /// Fill `buf` with the bytes the target sends in one segment.
    fn read(&mut self, buf: &mut [u8]);
    /// The transaction ended with a stop condition.
    fn stop(&mut self) {}
}

/// A simulated I2C bus, an embedded-hal [`I2c`] for 7- and 10-bit addresses.
///
/// Cheap to clone: clones share the bus and its targets, as several drivers share one
/// `/dev/i2c-N`.
#[derive(Clone)]
pub struct SimI2cBus {
    name: Arc<str>,
    targets: Arc<Mutex<Targets>>,
    /// Set by [`SimI2cBus::remove`], shared by every clone.
    removed: Arc<AtomicBool>,
}

/// Targets by (10-bit?, address).
type Targets = BTreeMap<(bool, u16), Box<dyn I2cPeer>>;

impl SimI2cBus {
    /// An empty bus called `name` (such as `i2c-1`).
    pub fn new(name: impl Into<String>) -> Self {
        SimI2cBus {
            name: Arc::from(name.into()),
            targets: Arc::default(),
            removed: Arc::default(),
        }
    }

    /// The bus's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Put `peer` on the bus at 7-bit `address` (0..=0x7f), replacing whatever was there.
    pub fn attach(&self, address: u8, peer: impl I2cPeer + 'static) -> Result<()> {
        if address > 0x7f {
            return Err(self.bus_error(format!("{address:#04x} is not a 7-bit address")));
        }
        self.lock()
            .insert((false, u16::from(address)), Box::new(peer));
        Ok(())
    }

    /// Put `peer` on the bus at 10-bit `address` (0..=0x3ff).
    pub fn attach_ten_bit(&self, address: u16, peer: impl I2cPeer + 'static) -> Result<()> {
        if address > 0x3ff {
            return Err(self.bus_error(format!("{address:#05x} is not a 10-bit address")));
        }
        self.lock().insert((true, address), Box::new(peer));
        Ok(())
    }

    /// Simulate the bus going away (a USB-I2C adapter unplugged, an unbound driver): every
    /// clone fails its transactions from now on, naming the bus, as i2c-dev fails with
    /// `ENODEV` once its adapter is gone.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether [`SimI2cBus::remove`] was called on this bus.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The 7-bit addresses that answer, as `i2cdetect` would list them.
    pub fn addresses(&self) -> Vec<u16> {
        self.lock()
            .keys()
            .filter(|(ten, _)| !ten)
            .map(|(_, a)| *a)
            .collect()
    }

    fn bus_error(&self, message: String) -> Error {
        Error::Bus {
            bus: self.name.to_string(),
            message,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Targets> {
        self.targets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run(&mut self, ten_bit: bool, address: u16, ops: &mut [Operation<'_>]) -> Result<()> {
        if self.is_removed() {
            return Err(self.bus_error("the I2C bus was removed".into()));
        }
        let mut targets = self.lock();
        let peer = targets
            .get_mut(&(ten_bit, address))
            .ok_or_else(|| Error::NoAcknowledge {
                bus: self.name.to_string(),
                address,
            })?;
        let mut i = 0;
        while i < ops.len() {
            // One segment: the run of adjacent operations of the same kind.
            let is_read = matches!(ops[i], Operation::Read(_));
            let end = ops[i..]
                .iter()
                .position(|op| matches!(op, Operation::Read(_)) != is_read)
                .map_or(ops.len(), |n| i + n);
            if is_read {
                let total: usize = ops[i..end]
                    .iter()
                    .map(|op| match op {
                        Operation::Read(b) => b.len(),
                        Operation::Write(_) => 0,
                    })
                    .sum();
                let mut data = vec![0u8; total];
                peer.read(&mut data);
                let mut at = 0;
                for op in &mut ops[i..end] {
                    if let Operation::Read(b) = op {
                        b.copy_from_slice(&data[at..at + b.len()]);
                        at += b.len();
                    }
                }
            } else {
                let mut data = Vec::new();
                for op in &ops[i..end] {
                    if let Operation::Write(b) = op {
                        data.extend_from_slice(b);
                    }
                }
                peer.write(&data);
            }
            i = end;
        }
        peer.stop();
        Ok(())
    }
}

impl std::fmt::Debug for SimI2cBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimI2cBus")
            .field("name", &self.name)
            .field("addresses", &self.addresses())
            .finish()
    }
}

impl ErrorType for SimI2cBus {
    type Error = Error;
}

impl I2c<SevenBitAddress> for SimI2cBus {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<()> {
        self.run(false, u16::from(address), operations)
    }
}

impl I2c<TenBitAddress> for SimI2cBus {
    fn transaction(&mut self, address: u16, operations: &mut [Operation<'_>]) -> Result<()> {
        self.run(true, address, operations)
    }
}

/// The TMP102 digital temperature sensor, modelled after its datasheet (TI SBOS397, section
/// 7.5 "Register maps").
///
/// The first byte of each write sets the pointer register (0 temperature, 1 configuration,
/// 2 T-low, 3 T-high); following bytes write the pointed register MSB first. Reads return the
/// pointed register MSB then LSB. Temperature is a 12-bit two's-complement value, 0.0625 °C per
/// LSB, left-justified; with the configuration's EM bit set it is 13 bits and bit 0 reads 1.
/// Its default address is 0x48 (ADD0 to ground).
///
/// Cheap to clone: clones share the sensor, so a test keeps one to set the temperature.
#[derive(Clone)]
pub struct Tmp102 {
    inner: Arc<Mutex<Tmp102State>>,
}

struct Tmp102State {
    /// Temperature in 1/16 °C steps (13-bit range, narrowed to 12 bits outside EM mode).
    sixteenths: i16,
    pointer: u8,
    config: u16,
    t_low: u16,
    t_high: u16,
}

impl Default for Tmp102 {
    fn default() -> Self {
        Tmp102 {
            inner: Arc::new(Mutex::new(Tmp102State {
                sixteenths: 0,
                pointer: 0,
                // Power-on values from the datasheet: 12-bit resolution bits set, 4 Hz, AL=1;
                // T-low 75 °C, T-high 80 °C.
                config: 0x60a0,
                t_low: 0x4b00,
                t_high: 0x5000,
            })),
        }
    }
}

impl Tmp102 {
    /// The address the TMP102 answers with ADD0 tied to ground.
    pub const DEFAULT_ADDRESS: u8 = 0x48;
    /// Configuration register bit: extended (13-bit) mode.
    const EM: u16 = 0x0010;

    /// A sensor reading 0 °C with the power-on register values.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the temperature the sensor measures, in °C; it reads back rounded to 0.0625 °C and
    /// clamped to what the register can hold (−256 to 255.9375 °C in EM mode).
    pub fn set_celsius(&self, celsius: f32) {
        let steps = (celsius * 16.0).round().clamp(-4096.0, 4095.0);
        // Clamped to the 13-bit range just above, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let steps = steps as i16;
        self.lock().sixteenths = steps;
    }

    /// Decode the two bytes read from the temperature register into °C, in either mode.
    pub fn decode(bytes: [u8; 2]) -> f32 {
        let raw = i16::from_be_bytes(bytes);
        let steps = if bytes[1] & 0x01 == 1 {
            raw >> 3
        } else {
            raw >> 4
        };
        f32::from(steps) * 0.0625
    }

    fn register(st: &Tmp102State, pointer: u8) -> u16 {
        match pointer & 0x03 {
            0 => {
                if st.config & Self::EM != 0 {
                    // 13 bits, left-justified from bit 15 down to bit 3, and bit 0 set.
                    (st.sixteenths << 3).cast_unsigned() | 0x0001
                } else {
                    let twelve = st.sixteenths.clamp(-2048, 2047);
                    (twelve << 4).cast_unsigned()
                }
            }
            1 => st.config,
            2 => st.t_low,
            _ => st.t_high,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tmp102State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl I2cPeer for Tmp102 {
    fn write(&mut self, data: &[u8]) {
        let mut st = self.lock();
        let Some((&pointer, rest)) = data.split_first() else {
            return;
        };
        st.pointer = pointer & 0x03;
        if let [msb, lsb, ..] = rest {
            let value = u16::from_be_bytes([*msb, *lsb]);
            match st.pointer {
                // Resolution bits R1 R0 read 1 always; AL is read-only.
                1 => st.config = (value & !0x6020) | 0x6000 | (st.config & 0x0020),
                2 => st.t_low = value,
                3 => st.t_high = value,
                _ => {} // temperature is read-only
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) {
        let st = self.lock();
        let bytes = Self::register(&st, st.pointer).to_be_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes[i % 2];
        }
    }
}

impl std::fmt::Debug for Tmp102 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Tmp102")
            .field("celsius", &(f32::from(st.sixteenths) / 16.0))
            .field("config", &format_args!("{:#06x}", st.config))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_celsius(bus: &mut impl I2c, address: u8) -> f32 {
        let mut buf = [0u8; 2];
        bus.write_read(address, &[0x00], &mut buf).expect("read");
        Tmp102::decode(buf)
    }

    #[test]
    fn tmp102_reads_decode_to_the_set_temperature() {
        let bus = SimI2cBus::new("i2c-1");
        let sensor = Tmp102::new();
        bus.attach(Tmp102::DEFAULT_ADDRESS, sensor.clone())
            .expect("address");
        let mut dev = bus.clone();
        for t in [25.0, -10.5, 0.0625, 127.9375, -55.0] {
            sensor.set_celsius(t);
            assert_eq!(read_celsius(&mut dev, 0x48), t);
        }
        sensor.set_celsius(21.03);
        assert_eq!(read_celsius(&mut dev, 0x48), 21.0, "rounded to 0.0625");
        sensor.set_celsius(150.0);
        assert_eq!(read_celsius(&mut dev, 0x48), 127.9375, "12-bit limit");
    }

    #[test]
    fn tmp102_register_layout_follows_the_datasheet() {
        let bus = SimI2cBus::new("i2c-1");
        let sensor = Tmp102::new();
        bus.attach(0x48, sensor.clone()).expect("address");
        let mut dev = bus.clone();
        sensor.set_celsius(25.0);
        // 25 °C = 400 steps = 0x190, left-justified: 0x1900.
        let mut buf = [0u8; 2];
        dev.write_read(0x48u8, &[0x00], &mut buf).expect("read");
        assert_eq!(buf, [0x19, 0x00]);
        // -25 °C: two's complement 0xe70 -> 0xe700.
        sensor.set_celsius(-25.0);
        dev.write_read(0x48u8, &[0x00], &mut buf).expect("read");
        assert_eq!(buf, [0xe7, 0x00]);
        // Power-on configuration, then switch to EM mode and read 150 °C in 13 bits.
        dev.write_read(0x48u8, &[0x01], &mut buf).expect("read");
        assert_eq!(buf, [0x60, 0xa0]);
        dev.write(0x48u8, &[0x01, 0x60, 0xb0]).expect("write");
        sensor.set_celsius(150.0);
        dev.write_read(0x48u8, &[0x00], &mut buf).expect("read");
        assert_eq!(buf[1] & 1, 1, "EM flag");
        assert_eq!(Tmp102::decode(buf), 150.0);
        // The pointer stays: a plain read returns the temperature register again.
        dev.read(0x48u8, &mut buf).expect("read");
        assert_eq!(Tmp102::decode(buf), 150.0);
        // T-high is writable and reads back.
        dev.write(0x48u8, &[0x03, 0x28, 0x00]).expect("write");
        dev.write_read(0x48u8, &[0x03], &mut buf).expect("read");
        assert_eq!(buf, [0x28, 0x00]);
    }

    #[test]
    fn adjacent_writes_form_one_segment() {
        let bus = SimI2cBus::new("i2c-1");
        let sensor = Tmp102::new();
        bus.attach(0x48, sensor).expect("address");
        let mut dev = bus.clone();
        // Pointer and data in separate Write operations: still one segment, so this writes
        // T-low rather than setting the pointer twice.
        dev.transaction(
            0x48u8,
            &mut [Operation::Write(&[0x02]), Operation::Write(&[0x12, 0x30])],
        )
        .expect("write");
        let mut a = [0u8; 1];
        let mut b = [0u8; 1];
        dev.transaction(
            0x48u8,
            &mut [
                Operation::Write(&[0x02]),
                Operation::Read(&mut a),
                Operation::Read(&mut b),
            ],
        )
        .expect("read");
        assert_eq!([a[0], b[0]], [0x12, 0x30]);
    }

    #[test]
    fn absent_address_is_not_acknowledged() {
        use embedded_hal::i2c::{Error as _, ErrorKind, NoAcknowledgeSource};
        let mut bus = SimI2cBus::new("i2c-1");
        bus.attach(0x48, Tmp102::new()).expect("address");
        let err = bus.write(0x76u8, &[0xd0]).expect_err("nobody at 0x76");
        assert_eq!(
            err.to_string(),
            "i2c-1: no device acknowledged address 0x76"
        );
        assert_eq!(
            err.kind(),
            ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address)
        );
        assert!(bus.attach(0x80, Tmp102::new()).is_err());
    }

    #[test]
    fn a_removed_bus_fails_every_clone_naming_it() {
        let bus = SimI2cBus::new("i2c-1");
        bus.attach(0x48, Tmp102::new()).expect("address");
        let mut dev = bus.clone();
        read_celsius(&mut dev, 0x48);
        bus.remove();
        assert!(dev.is_removed());
        let mut buf = [0u8; 2];
        let err = dev.write_read(0x48u8, &[0x00], &mut buf).expect_err("gone");
        assert_eq!(err.to_string(), "i2c-1: the I2C bus was removed");
    }

    #[test]
    fn ten_bit_addresses_are_a_separate_space() {
        let mut bus = SimI2cBus::new("i2c-1");
        let sensor = Tmp102::new();
        sensor.set_celsius(30.0);
        bus.attach_ten_bit(0x248, sensor).expect("address");
        let mut buf = [0u8; 2];
        bus.write_read(0x248u16, &[0x00], &mut buf).expect("read");
        assert_eq!(Tmp102::decode(buf), 30.0);
        assert!(bus.write_read(0x48u8, &[0x00], &mut buf).is_err());
    }
}
