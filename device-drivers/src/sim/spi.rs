//! A simulated SPI device and an MCP3008 ADC model behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use embedded_hal::spi::{ErrorType, Operation, SpiDevice};

use crate::{Error, Result, SpiConfig};

/// A peripheral on a simulated SPI bus, clocked one byte at a time.
pub trait SpiPeer: Send {
    /// Chip-select went active: a new transaction begins.
    fn select(&mut self);
    /// One byte out on MOSI; returns the byte the peripheral put on MISO at the same time.
    fn exchange(&mut self, mosi: u8) -> u8;
    /// Chip-select went inactive.
    fn deselect(&mut self);
}

/// A simulated SPI device (one chip-select on one bus), an embedded-hal [`SpiDevice`].
///
/// Chip-select is held for the whole of each transaction, as spidev holds it over one
/// `SPI_IOC_MESSAGE`.
pub struct SimSpiDevice {
    name: String,
    config: SpiConfig,
    peer: Arc<Mutex<dyn SpiPeer>>,
    /// Set by [`SimSpiDevice::remove`], shared by every handle on the chip-select.
    removed: Arc<AtomicBool>,
    transactions: u64,
}

impl SimSpiDevice {
    /// A device called `name` (such as `spi0.0`) with `peer` on the other end.
    pub fn new(name: impl Into<String>, config: SpiConfig, peer: impl SpiPeer + 'static) -> Self {
        SimSpiDevice {
            name: name.into(),
            config,
            peer: Arc::new(Mutex::new(peer)),
            removed: Arc::default(),
            transactions: 0,
        }
    }

    /// Another handle on the same chip-select and peripheral, with its own configuration.
    /// Transactions from the two handles never interleave.
    pub fn with_config(&self, config: SpiConfig) -> Self {
        SimSpiDevice {
            name: self.name.clone(),
            config,
            peer: Arc::clone(&self.peer),
            removed: Arc::clone(&self.removed),
            transactions: 0,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> SpiConfig {
        self.config
    }

    /// How many transactions have run.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Simulate the device going away (an unbound controller driver, a hat pulled off):
    /// every handle on this chip-select fails its transactions from now on, naming the
    /// device, as spidev fails with `ENODEV` once its device is gone.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether [`SimSpiDevice::remove`] was called on this chip-select.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

impl Clone for SimSpiDevice {
    fn clone(&self) -> Self {
        self.with_config(self.config)
    }
}

impl std::fmt::Debug for SimSpiDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSpiDevice")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ErrorType for SimSpiDevice {
    type Error = Error;
}

impl SpiDevice<u8> for SimSpiDevice {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<()> {
        if self.is_removed() {
            return Err(Error::Bus {
                bus: self.name.clone(),
                message: "the SPI device was removed".into(),
            });
        }
        if self.config.bits_per_word != 8 {
            return Err(Error::Bus {
                bus: self.name.clone(),
                message: format!(
                    "{} bits per word is not supported by the simulator",
                    self.config.bits_per_word
                ),
            });
        }
        // Held for the whole transaction: chip-select stays active, nobody else clocks.
        let mut peer = self
            .peer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        peer.select();
        for op in operations.iter_mut() {
            match op {
                Operation::Read(buf) => {
                    for b in buf.iter_mut() {
                        *b = peer.exchange(0x00);
                    }
                }
                Operation::Write(buf) => {
                    for b in buf.iter() {
                        peer.exchange(*b);
                    }
                }
                Operation::Transfer(read, write) => {
                    // embedded-hal: clock max(len) words; past the end of `write` send 0x00,
                    // past the end of `read` discard.
                    for i in 0..read.len().max(write.len()) {
                        let miso = peer.exchange(write.get(i).copied().unwrap_or(0));
                        if let Some(r) = read.get_mut(i) {
                            *r = miso;
                        }
                    }
                }
                Operation::TransferInPlace(buf) => {
                    for b in buf.iter_mut() {
                        *b = peer.exchange(*b);
                    }
                }
                Operation::DelayNs(_) => {}
            }
        }
        peer.deselect();
        drop(peer);
        self.transactions += 1;
        Ok(())
    }
}

/// The MCP3008: an 8-channel, 10-bit SPI ADC, modelled bit by bit after its datasheet
/// (Microchip DS21295, section 5 "Serial communications").
///
/// With chip-select low, the first 1 clocked in is the start bit; then SGL/DIFF and D2 D1 D0
/// choose the input; one clock completes the sample, the next outputs a null 0 bit, then the
/// 10-bit result follows MSB first (and, if clocking continues, LSB first, then zeros). So the
/// usual byte-aligned exchange `[0x01, 0x80 | ch << 4, 0x00]` returns
/// `[_, result >> 8 & 0x03, result & 0xff]`.
///
/// Cheap to clone: clones share the channel values, so a test keeps one to set inputs while
/// the [`SimSpiDevice`] owns another.
#[derive(Clone, Default)]
pub struct Mcp3008 {
    inner: Arc<Mutex<Mcp3008State>>,
}

#[derive(Default)]
struct Mcp3008State {
    channels: [u16; 8],
    phase: Phase,
    conversions: u64,
}

#[derive(Default, Clone, Copy)]
enum Phase {
    /// Waiting for the start bit.
    #[default]
    Idle,
    /// Reading SGL/DIFF, D2, D1, D0: `got` bits so far in `bits`.
    Config { got: u8, bits: u8 },
    /// After D0: `clock` 0 is the sample clock, 1 the null bit, 2..=11 B9..B0 (MSB first),
    /// 12..=20 B1..B9 (LSB first), then zeros.
    Output { clock: u8, value: u16 },
}

impl Mcp3008 {
    /// Full-scale code (10 bits).
    pub const MAX_CODE: u16 = 1023;

    /// A converter with every input at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set single-ended input `channel` (0..=7) to `code` (clamped to 0..=1023).
    pub fn set_channel(&self, channel: usize, code: u16) -> Result<()> {
        let mut st = self.lock();
        let slot = st.channels.get_mut(channel).ok_or_else(|| Error::Bus {
            bus: "mcp3008".into(),
            message: format!("channel {channel} does not exist (0..=7)"),
        })?;
        *slot = code.min(Self::MAX_CODE);
        Ok(())
    }

    /// Set input `channel` to `volts` against reference `vref`, as the converter would code it.
    pub fn set_voltage(&self, channel: usize, volts: f64, vref: f64) -> Result<()> {
        let code = (volts / vref * 1024.0)
            .floor()
            .clamp(0.0, f64::from(Self::MAX_CODE));
        // Clamped to 0..=1023 just above, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.set_channel(channel, code as u16)
    }

    /// The code input `channel` is set to.
    pub fn channel(&self, channel: usize) -> Option<u16> {
        self.lock().channels.get(channel).copied()
    }

    /// Conversions performed so far (one per start bit).
    pub fn conversions(&self) -> u64 {
        self.lock().conversions
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mcp3008State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Mcp3008State {
    /// One clock: `din` in, returns DOUT.
    fn clock(&mut self, din: bool) -> bool {
        match self.phase {
            Phase::Idle => {
                if din {
                    self.phase = Phase::Config { got: 0, bits: 0 };
                }
                false
            }
            Phase::Config { got, bits } => {
                let bits = bits << 1 | u8::from(din);
                if got + 1 == 4 {
                    let single = bits & 0b1000 != 0;
                    let sel = usize::from(bits & 0b0111);
                    let value = if single {
                        self.channels[sel]
                    } else {
                        // Differential pairs (datasheet table 5-2): 000 is CH0+ CH1-, 001 is
                        // CH0- CH1+, and so on; a negative difference codes as 0.
                        let pair = sel & !1;
                        let (plus, minus) = if sel & 1 == 0 {
                            (pair, pair + 1)
                        } else {
                            (pair + 1, pair)
                        };
                        self.channels[plus].saturating_sub(self.channels[minus])
                    };
                    self.conversions += 1;
                    self.phase = Phase::Output { clock: 0, value };
                } else {
                    self.phase = Phase::Config { got: got + 1, bits };
                }
                false
            }
            Phase::Output { clock, value } => {
                let out = match clock {
                    0 | 1 => false,
                    2..=11 => value >> (11 - clock) & 1 == 1,
                    12..=20 => value >> (clock - 11) & 1 == 1,
                    _ => false,
                };
                self.phase = Phase::Output {
                    clock: clock.saturating_add(1),
                    value,
                };
                out
            }
        }
    }
}

impl SpiPeer for Mcp3008 {
    fn select(&mut self) {
        self.lock().phase = Phase::Idle;
    }

    fn exchange(&mut self, mosi: u8) -> u8 {
        let mut st = self.lock();
        let mut miso = 0u8;
        for bit in (0..8).rev() {
            let out = st.clock(mosi >> bit & 1 == 1);
            miso |= u8::from(out) << bit;
        }
        miso
    }

    fn deselect(&mut self) {
        self.lock().phase = Phase::Idle;
    }
}

impl std::fmt::Debug for Mcp3008 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mcp3008")
            .field("channels", &self.lock().channels)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read one channel the way most MCP3008 drivers do: three bytes, start bit in the first.
    fn read_single(spi: &mut impl SpiDevice<u8>, ch: u8) -> u16 {
        let tx = [0x01, 0x80 | ch << 4, 0x00];
        let mut rx = [0u8; 3];
        spi.transfer(&mut rx, &tx).expect("transfer");
        u16::from(rx[1] & 0x03) << 8 | u16::from(rx[2])
    }

    #[test]
    fn adc_reads_the_value_set_on_each_channel() {
        let adc = Mcp3008::new();
        let mut spi = SimSpiDevice::new("spi0.0", SpiConfig::default(), adc.clone());
        for ch in 0..8u8 {
            adc.set_channel(usize::from(ch), 100 * u16::from(ch) + 23)
                .expect("channel");
        }
        for ch in 0..8u8 {
            assert_eq!(read_single(&mut spi, ch), 100 * u16::from(ch) + 23);
        }
        adc.set_channel(3, 1023).expect("channel");
        assert_eq!(read_single(&mut spi, 3), 1023);
        assert_eq!(adc.conversions(), 9);
        assert_eq!(spi.transactions(), 9);
    }

    #[test]
    fn adc_works_with_other_framings() {
        let adc = Mcp3008::new();
        adc.set_channel(5, 0x2a5).expect("channel");
        let mut spi = SimSpiDevice::new("spi0.0", SpiConfig::default(), adc.clone());
        // The MCP3208-style framing: start, SGL, D2 ending byte 1, D1 D0 opening byte 2; the
        // 10 result bits are then B9..B6 in byte 2 and B5..B0 at the top of byte 3.
        let ch = 5u8;
        let tx = [0x06 | (ch >> 2), (ch & 0x03) << 6, 0x00];
        let mut rx = [0u8; 3];
        spi.transaction(&mut [Operation::Transfer(&mut rx, &tx)])
            .expect("transfer");
        assert_eq!(u16::from(rx[1] & 0x0f) << 6 | u16::from(rx[2] >> 2), 0x2a5);
        // Write then read in one transaction, chip-select held between them.
        let mut rx2 = [0u8; 2];
        spi.transaction(&mut [
            Operation::Write(&[0x01]),
            Operation::TransferInPlace(&mut [0x80 | ch << 4]),
            Operation::Read(&mut rx2),
        ])
        .expect("transaction");
        // After the config byte: 2 result bits in the last two clocks of byte 2 were
        // discarded by TransferInPlace; here the next 8 bits are B7..B0.
        assert_eq!(rx2[0], 0xa5);
        assert_eq!(adc.conversions(), 2);
    }

    #[test]
    fn adc_differential_pair_codes_the_difference() {
        let adc = Mcp3008::new();
        adc.set_channel(0, 700).expect("channel");
        adc.set_channel(1, 200).expect("channel");
        let mut spi = SimSpiDevice::new("spi0.0", SpiConfig::default(), adc.clone());
        let mut rx = [0u8; 3];
        // SGL/DIFF = 0, D2..D0 = 000: CH0+ CH1-.
        spi.transfer(&mut rx, &[0x01, 0x00, 0x00])
            .expect("transfer");
        assert_eq!(u16::from(rx[1] & 0x03) << 8 | u16::from(rx[2]), 500);
        // 001: CH0- CH1+, negative, codes 0.
        spi.transfer(&mut rx, &[0x01, 0x10, 0x00])
            .expect("transfer");
        assert_eq!(u16::from(rx[1] & 0x03) << 8 | u16::from(rx[2]), 0);
    }

    #[test]
    fn a_removed_device_fails_every_handle_naming_it() {
        let adc = Mcp3008::new();
        let spi = SimSpiDevice::new("spi0.0", SpiConfig::default(), adc.clone());
        let mut a = spi.with_config(SpiConfig::default());
        let mut b = spi.clone();
        assert_eq!(read_single(&mut a, 0), 0);
        spi.remove();
        assert!(b.is_removed());
        let mut rx = [0u8; 3];
        let err = b.transfer(&mut rx, &[0x01, 0x80, 0x00]).expect_err("gone");
        assert_eq!(err.to_string(), "spi0.0: the SPI device was removed");
        assert!(a.transfer(&mut rx, &[0x01, 0x80, 0x00]).is_err());
        assert_eq!(
            adc.conversions(),
            1,
            "nothing reached the ADC after the removal"
        );
    }

    #[test]
    fn adc_voltage_helper_and_bad_channel() {
        let adc = Mcp3008::new();
        adc.set_voltage(2, 1.65, 3.3).expect("channel");
        assert_eq!(adc.channel(2), Some(512));
        let err = adc.set_channel(8, 1).expect_err("no channel 8");
        assert_eq!(err.to_string(), "mcp3008: channel 8 does not exist (0..=7)");
    }
}
