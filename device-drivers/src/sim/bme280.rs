//! The Bosch BME280 humidity, pressure and temperature sensor, modelled after its datasheet
//! (BST-BME280-DS002, section 5 "Global memory map and register description").
//!
//! What a driver sees: chip id 0x60 at 0xD0, soft reset at 0xE0, the factory calibration at
//! 0x88..=0xA1 and 0xE1..=0xE7, `ctrl_hum` (0xF2), `status` (0xF3), `ctrl_meas` (0xF4),
//! `config` (0xF5), and the raw ADC values at 0xF7..=0xFE (pressure and temperature 20 bits,
//! humidity 16 bits, MSB first). Reads auto-increment from the register pointer; writes are
//! (register, value) pairs after the first register byte, as in the datasheet's section 6.2.1.
//!
//! The model holds a set environment (°C, Pa, %RH) and a calibration taken from a real part.
//! A measurement (forced mode, or each read in normal mode) turns the environment into the
//! raw values that the datasheet's integer compensation (section 4.2.3) maps back to it, so a
//! driver that compensates as the datasheet says reads the set values, to the sensor's
//! resolution. Oversampling 0 skips a measurement (its registers read 0x80000 / 0x8000);
//! `ctrl_hum` takes effect at the next write of `ctrl_meas`, as on the part.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::sim::I2cPeer;

/// Register addresses and values from the datasheet.
mod reg {
    pub const CALIB_00: u8 = 0x88;
    pub const CALIB_26: u8 = 0xE1;
    pub const CHIP_ID: u8 = 0xD0;
    pub const RESET: u8 = 0xE0;
    pub const CTRL_HUM: u8 = 0xF2;
    pub const STATUS: u8 = 0xF3;
    pub const CTRL_MEAS: u8 = 0xF4;
    pub const CONFIG: u8 = 0xF5;
    pub const PRESS_MSB: u8 = 0xF7;
    /// The chip id of every BME280 (a BMP280 answers 0x58).
    pub const ID: u8 = 0x60;
    /// The value that resets the chip when written to `RESET`.
    pub const RESET_WORD: u8 = 0xB6;
}

/// The factory trimming parameters (datasheet table 16), as one real BME280 reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bme280Calibration {
    /// `dig_T1` .. `dig_T3`.
    pub t: (u16, i16, i16),
    /// `dig_P1` .. `dig_P9`.
    pub p: (u16, [i16; 8]),
    /// `dig_H1` .. `dig_H6` (H4 and H5 are 12-bit signed).
    pub h: (u8, i16, u8, i16, i16, i8),
}

impl Default for Bme280Calibration {
    fn default() -> Self {
        Bme280Calibration {
            t: (27504, 26435, -1000),
            p: (36477, [-10685, 3024, 2855, 140, -7, 15500, -14600, 6000]),
            h: (75, 362, 0, 313, 50, 30),
        }
    }
}

impl Bme280Calibration {
    /// The calibration as it sits in the registers: 0x88..=0xA1 (26 bytes) and 0xE1..=0xE7
    /// (7 bytes), little-endian words, H4/H5 packed in 12 bits.
    fn registers(&self) -> ([u8; 26], [u8; 7]) {
        let mut low = [0u8; 26];
        low[0..2].copy_from_slice(&self.t.0.to_le_bytes());
        low[2..4].copy_from_slice(&self.t.1.to_le_bytes());
        low[4..6].copy_from_slice(&self.t.2.to_le_bytes());
        low[6..8].copy_from_slice(&self.p.0.to_le_bytes());
        for (i, p) in self.p.1.iter().enumerate() {
            low[8 + 2 * i..10 + 2 * i].copy_from_slice(&p.to_le_bytes());
        }
        // 0xA0 is reserved; 0xA1 is dig_H1.
        low[25] = self.h.0;
        let (_, h2, h3, h4, h5, h6) = self.h;
        let mut high = [0u8; 7];
        high[0..2].copy_from_slice(&h2.to_le_bytes());
        high[2] = h3;
        // 0xE4 = H4[11:4], 0xE5 = H5[3:0] << 4 | H4[3:0], 0xE6 = H5[11:4].
        // The low byte of each shifted field (`to_le_bytes()[0]`), as the chip packs them.
        let (h4, h5) = (h4.cast_unsigned(), h5.cast_unsigned());
        high[3] = (h4 >> 4).to_le_bytes()[0];
        high[4] = (((h5 & 0x0f) << 4) | (h4 & 0x0f)).to_le_bytes()[0];
        high[5] = (h5 >> 4).to_le_bytes()[0];
        high[6] = h6.cast_unsigned();
        (low, high)
    }

    /// Datasheet 4.2.3 `BME280_compensate_T_int32`: (°C in 0.01 steps, t_fine).
    fn temperature(&self, adc_t: i32) -> (i32, i32) {
        let (t1, t2, t3) = (
            i32::from(self.t.0),
            i32::from(self.t.1),
            i32::from(self.t.2),
        );
        let var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11;
        let var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14;
        let t_fine = var1 + var2;
        ((t_fine * 5 + 128) >> 8, t_fine)
    }

    /// Datasheet 4.2.3 `BME280_compensate_P_int64`: Pa in Q24.8.
    fn pressure(&self, adc_p: i32, t_fine: i32) -> u32 {
        let p1 = i64::from(self.p.0);
        let [p2, p3, p4, p5, p6, p7, p8, p9] = self.p.1.map(i64::from);
        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1 * var1 * p6;
        var2 += (var1 * p5) << 17;
        var2 += p4 << 35;
        var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12);
        var1 = (((1i64 << 47) + var1) * p1) >> 33;
        if var1 == 0 {
            return 0;
        }
        let mut p = 1_048_576 - i64::from(adc_p);
        p = (((p << 31) - var2) * 3125) / var1;
        let var1 = (p9 * (p >> 13) * (p >> 13)) >> 25;
        let var2 = (p8 * p) >> 19;
        p = ((p + var1 + var2) >> 8) + (p7 << 4);
        u32::try_from(p).unwrap_or(0)
    }

    /// Datasheet 4.2.3 `bme280_compensate_H_int32`: %RH in Q22.10.
    fn humidity(&self, adc_h: i32, t_fine: i32) -> u32 {
        let (h1, h2, h3, h4, h5, h6) = self.h;
        let (h1, h2, h3, h4, h5, h6) = (
            i32::from(h1),
            i32::from(h2),
            i32::from(h3),
            i32::from(h4),
            i32::from(h5),
            i32::from(h6),
        );
        let mut v = t_fine - 76_800;
        v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16_384) >> 15)
            * (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32_768)) >> 10) + 2_097_152) * h2
                + 8192)
                >> 14);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        let v = v.clamp(0, 419_430_400);
        // Clamped to 0 and above: its absolute value is itself.
        (v >> 12).unsigned_abs()
    }
}

/// The smallest `x` in `0..limit` with `f(x) >= target`, for `f` non-decreasing (the
/// compensation curves are, over the sensor's range); `limit - 1` if there is none.
fn invert(limit: i32, target: i64, f: impl Fn(i32) -> i64) -> i32 {
    let (mut lo, mut hi) = (0, limit - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if f(mid) >= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// A simulated BME280. Cheap to clone: clones share the sensor, so a test keeps one to set
/// the environment. Its default address is 0x76 (SDO to ground); 0x77 with SDO high.
#[derive(Clone)]
pub struct Bme280 {
    inner: Arc<Mutex<State>>,
}

struct State {
    calibration: Bme280Calibration,
    celsius: f64,
    pascal: f64,
    humidity: f64,
    pointer: u8,
    /// `ctrl_hum` as written; copied to `osrs_h` at the next `ctrl_meas` write.
    ctrl_hum: u8,
    osrs_h: u8,
    ctrl_meas: u8,
    config: u8,
    /// The data registers 0xF7..=0xFE.
    data: [u8; 8],
    measurements: u64,
}

impl State {
    fn reset(&mut self) {
        self.pointer = 0;
        self.ctrl_hum = 0;
        self.osrs_h = 0;
        self.ctrl_meas = 0;
        self.config = 0;
        // Reset values of the data registers (datasheet table 18).
        self.data = [0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x00];
    }

    /// One measurement of the set environment into the data registers.
    // The set environment is scaled to fixed point with `as`, which saturates (NaN gives 0):
    // an out-of-range setting reads as the nearest value the chip's arithmetic can hold.
    #[allow(clippy::cast_possible_truncation)]
    fn measure(&mut self) {
        let cal = self.calibration;
        let osrs_t = self.ctrl_meas >> 5;
        let osrs_p = (self.ctrl_meas >> 2) & 0x07;
        let centi = (self.celsius * 100.0).round() as i64;
        let adc_t = invert(1 << 20, centi, |adc| i64::from(cal.temperature(adc).0));
        let t_fine = cal.temperature(adc_t).1;
        // Pressure falls as adc_P rises: invert on the negated curve.
        let q8 = (self.pascal * 256.0).round() as i64;
        let adc_p = invert(1 << 20, -q8, |adc| -i64::from(cal.pressure(adc, t_fine)));
        let q10 = (self.humidity * 1024.0).round() as i64;
        let adc_h = invert(1 << 16, q10, |adc| i64::from(cal.humidity(adc, t_fine)));
        // A 20-bit reading as the chip's MSB, LSB and XLSB registers (low bytes of the shifts).
        let twenty = |v: i32| {
            [
                (v >> 12).to_le_bytes()[0],
                (v >> 4).to_le_bytes()[0],
                ((v & 0x0f) << 4).to_le_bytes()[0],
            ]
        };
        let skipped20 = [0x80, 0x00, 0x00];
        let [p0, p1, p2] = if osrs_p == 0 {
            skipped20
        } else {
            twenty(adc_p)
        };
        let [t0, t1, t2] = if osrs_t == 0 {
            skipped20
        } else {
            twenty(adc_t)
        };
        let [h0, h1] = if self.osrs_h == 0 {
            [0x80, 0x00]
        } else {
            // The 16-bit reading: the low two bytes of `adc_h`, big-endian.
            let [_, _, msb, lsb] = adc_h.to_be_bytes();
            [msb, lsb]
        };
        self.data = [p0, p1, p2, t0, t1, t2, h0, h1];
        self.measurements += 1;
    }

    fn register(&mut self, address: u8) -> u8 {
        let (low, high) = self.calibration.registers();
        match address {
            reg::CHIP_ID => reg::ID,
            reg::CALIB_00..=0xA1 => low[usize::from(address - reg::CALIB_00)],
            reg::CALIB_26..=0xE7 => high[usize::from(address - reg::CALIB_26)],
            reg::CTRL_HUM => self.ctrl_hum,
            // A forced measurement completes within the write that started it: never busy.
            reg::STATUS => 0,
            reg::CTRL_MEAS => self.ctrl_meas,
            reg::CONFIG => self.config,
            reg::PRESS_MSB..=0xFE => {
                // Normal mode measures continuously: every burst read sees a fresh one.
                if address == reg::PRESS_MSB && self.ctrl_meas & 0x03 == 0x03 {
                    self.measure();
                }
                self.data[usize::from(address - reg::PRESS_MSB)]
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, address: u8, value: u8) {
        match address {
            reg::RESET if value == reg::RESET_WORD => self.reset(),
            reg::CTRL_HUM => self.ctrl_hum = value & 0x07,
            reg::CTRL_MEAS => {
                self.osrs_h = self.ctrl_hum;
                self.ctrl_meas = value;
                // Forced mode (01 or 10): one measurement, then back to sleep.
                if matches!(value & 0x03, 0x01 | 0x02) {
                    self.measure();
                    self.ctrl_meas &= !0x03;
                }
            }
            reg::CONFIG => self.config = value & 0xfd,
            _ => {} // read-only or reserved
        }
    }
}

impl Default for Bme280 {
    fn default() -> Self {
        let mut state = State {
            calibration: Bme280Calibration::default(),
            celsius: 21.5,
            pascal: 101_325.0,
            humidity: 45.0,
            pointer: 0,
            ctrl_hum: 0,
            osrs_h: 0,
            ctrl_meas: 0,
            config: 0,
            data: [0; 8],
            measurements: 0,
        };
        state.reset();
        Bme280 {
            inner: Arc::new(Mutex::new(state)),
        }
    }
}

impl Bme280 {
    /// The address the BME280 answers with SDO tied to ground.
    pub const DEFAULT_ADDRESS: u8 = 0x76;

    /// A sensor in sleep mode after power-on, measuring 21.5 °C, 101325 Pa and 45 %RH once
    /// asked to.
    pub fn new() -> Self {
        Self::default()
    }

    /// The factory calibration in its registers.
    pub fn calibration(&self) -> Bme280Calibration {
        self.lock().calibration
    }

    /// Set the temperature the sensor measures, in °C (the part's range is −40 to 85 °C).
    pub fn set_celsius(&self, celsius: f64) {
        self.lock().celsius = celsius.clamp(-40.0, 85.0);
    }

    /// Set the pressure the sensor measures, in Pa (the part's range is 30000 to 110000 Pa).
    pub fn set_pascal(&self, pascal: f64) {
        self.lock().pascal = pascal.clamp(30_000.0, 110_000.0);
    }

    /// Set the relative humidity the sensor measures, in % (0 to 100).
    pub fn set_humidity(&self, percent: f64) {
        self.lock().humidity = percent.clamp(0.0, 100.0);
    }

    /// How many measurements the sensor has made.
    pub fn measurements(&self) -> u64 {
        self.lock().measurements
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl I2cPeer for Bme280 {
    fn write(&mut self, data: &[u8]) {
        let mut st = self.lock();
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        st.pointer = first;
        // Data bytes follow their register; further pairs name their own register.
        let mut address = first;
        let mut bytes = rest.iter();
        while let Some(&value) = bytes.next() {
            st.write_register(address, value);
            match bytes.next() {
                Some(&next) => address = next,
                None => break,
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) {
        let mut st = self.lock();
        for b in buf.iter_mut() {
            let address = st.pointer;
            *b = st.register(address);
            st.pointer = st.pointer.wrapping_add(1);
        }
    }
}

impl std::fmt::Debug for Bme280 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Bme280")
            .field("celsius", &st.celsius)
            .field("pascal", &st.pascal)
            .field("humidity", &st.humidity)
            .field("ctrl_meas", &format_args!("{:#04x}", st.ctrl_meas))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use embedded_hal::i2c::I2c;

    use super::*;
    use crate::sim::SimI2cBus;

    /// A driver written from the datasheet alone, as a user's would be: it reads the chip id
    /// and the calibration, starts a forced measurement, reads the burst of data registers
    /// and compensates with the datasheet's floating-point formulas (section 8.1), not the
    /// integer ones the model inverts.
    struct Driver<I> {
        i2c: I,
        address: u8,
        t: (f64, f64, f64),
        p: [f64; 9],
        h: [f64; 6],
    }

    impl<I: I2c> Driver<I> {
        fn new(mut i2c: I, address: u8) -> Result<Self, I::Error> {
            let mut id = [0u8];
            i2c.write_read(address, &[0xD0], &mut id)?;
            assert_eq!(id[0], 0x60, "a BME280 answers chip id 0x60");
            let mut a = [0u8; 26];
            i2c.write_read(address, &[0x88], &mut a)?;
            let mut b = [0u8; 7];
            i2c.write_read(address, &[0xE1], &mut b)?;
            let u = |i: usize| f64::from(u16::from_le_bytes([a[i], a[i + 1]]));
            let s = |i: usize| f64::from(i16::from_le_bytes([a[i], a[i + 1]]));
            let h4 = (i16::from(b[3].cast_signed()) << 4) | i16::from(b[4] & 0x0f);
            let h5 = (i16::from(b[5].cast_signed()) << 4) | i16::from(b[4] >> 4);
            Ok(Driver {
                i2c,
                address,
                t: (u(0), s(2), s(4)),
                p: [u(6), s(8), s(10), s(12), s(14), s(16), s(18), s(20), s(22)],
                h: [
                    f64::from(a[25]),
                    f64::from(i16::from_le_bytes([b[0], b[1]])),
                    f64::from(b[2]),
                    f64::from(h4),
                    f64::from(h5),
                    f64::from(b[6].cast_signed()),
                ],
            })
        }

        /// (°C, Pa, %RH) from one forced measurement at oversampling x1.
        fn measure(&mut self) -> Result<(f64, f64, f64), I::Error> {
            self.i2c.write(self.address, &[0xF2, 0x01])?;
            self.i2c.write(self.address, &[0xF4, 0x25])?;
            let mut status = [0u8];
            loop {
                self.i2c.write_read(self.address, &[0xF3], &mut status)?;
                if status[0] & 0x08 == 0 {
                    break;
                }
            }
            let mut d = [0u8; 8];
            self.i2c.write_read(self.address, &[0xF7], &mut d)?;
            let twenty = |i: usize| {
                i32::from(d[i]) << 12 | i32::from(d[i + 1]) << 4 | i32::from(d[i + 2]) >> 4
            };
            let (adc_p, adc_t) = (f64::from(twenty(0)), f64::from(twenty(3)));
            let adc_h = f64::from(u16::from_be_bytes([d[6], d[7]]));

            let (t1, t2, t3) = self.t;
            let var1 = (adc_t / 16384.0 - t1 / 1024.0) * t2;
            let var2 = (adc_t / 131072.0 - t1 / 8192.0).powi(2) * t3;
            let t_fine = (var1 + var2).trunc();
            let celsius = (var1 + var2) / 5120.0;

            let [p1, p2, p3, p4, p5, p6, p7, p8, p9] = self.p;
            let mut var1 = t_fine / 2.0 - 64000.0;
            let mut var2 = var1 * var1 * p6 / 32768.0;
            var2 += var1 * p5 * 2.0;
            var2 = var2 / 4.0 + p4 * 65536.0;
            var1 = (p3 * var1 * var1 / 524288.0 + p2 * var1) / 524288.0;
            var1 = (1.0 + var1 / 32768.0) * p1;
            let mut p = 1048576.0 - adc_p;
            p = (p - var2 / 4096.0) * 6250.0 / var1;
            let var1 = p9 * p * p / 2147483648.0;
            let var2 = p * p8 / 32768.0;
            let pascal = p + (var1 + var2 + p7) / 16.0;

            let [h1, h2, h3, h4, h5, h6] = self.h;
            let mut h = t_fine - 76800.0;
            h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * h))
                * (h2 / 65536.0 * (1.0 + h6 / 67108864.0 * h * (1.0 + h3 / 67108864.0 * h)));
            h *= 1.0 - h1 * h / 524288.0;
            Ok((celsius, pascal, h.clamp(0.0, 100.0)))
        }
    }

    fn board_with(sensor: &Bme280) -> SimI2cBus {
        let bus = SimI2cBus::new("i2c-1");
        bus.attach(Bme280::DEFAULT_ADDRESS, sensor.clone())
            .expect("address");
        bus
    }

    #[test]
    fn a_datasheet_driver_reads_the_set_environment() {
        let sensor = Bme280::new();
        let mut driver = Driver::new(board_with(&sensor), 0x76).expect("probe");
        for (celsius, pascal, humidity) in [
            (21.5, 101_325.0, 45.0),
            (-10.25, 95_000.0, 80.0),
            (60.0, 70_000.0, 5.0),
            (0.0, 110_000.0, 100.0),
        ] {
            sensor.set_celsius(celsius);
            sensor.set_pascal(pascal);
            sensor.set_humidity(humidity);
            let (t, p, h) = driver.measure().expect("measure");
            assert!((t - celsius).abs() < 0.02, "{t} °C for {celsius}");
            assert!((p - pascal).abs() < 2.0, "{p} Pa for {pascal}");
            assert!((h - humidity).abs() < 0.1, "{h} %RH for {humidity}");
        }
        assert_eq!(sensor.measurements(), 4, "one forced measurement each");
    }

    #[test]
    fn registers_follow_the_datasheet_layout() {
        let sensor = Bme280::new();
        let mut bus = board_with(&sensor);
        // dig_T1 = 27504 = 0x6B70, little-endian at 0x88.
        let mut buf = [0u8; 2];
        bus.write_read(0x76u8, &[0x88], &mut buf).expect("read");
        assert_eq!(buf, [0x70, 0x6b]);
        // Before any measurement the data registers hold their reset values.
        let mut data = [0u8; 8];
        bus.write_read(0x76u8, &[0xF7], &mut data).expect("read");
        assert_eq!(data, [0x80, 0, 0, 0x80, 0, 0, 0x80, 0]);
        // ctrl_meas reads back with the forced mode bits cleared after the measurement.
        bus.write(0x76u8, &[0xF4, 0x25]).expect("write");
        bus.write_read(0x76u8, &[0xF4], &mut buf[..1])
            .expect("read");
        assert_eq!(buf[0], 0x24);
        // Humidity was not enabled (ctrl_hum 0): skipped, 0x8000; temperature measured.
        bus.write_read(0x76u8, &[0xF7], &mut data).expect("read");
        assert_eq!(&data[6..], &[0x80, 0x00]);
        assert_ne!(&data[3..6], &[0x80, 0x00, 0x00]);
        // Pairs: ctrl_hum then ctrl_meas in one write, normal mode measures at every read.
        bus.write(0x76u8, &[0xF2, 0x01, 0xF4, 0x27]).expect("write");
        bus.write_read(0x76u8, &[0xF7], &mut data).expect("read");
        assert_ne!(&data[6..], &[0x80, 0x00], "humidity on");
        let before = sensor.measurements();
        bus.write_read(0x76u8, &[0xF7], &mut data).expect("read");
        assert_eq!(sensor.measurements(), before + 1);
        // Soft reset: back to sleep and reset values.
        bus.write(0x76u8, &[0xE0, 0xB6]).expect("write");
        bus.write_read(0x76u8, &[0xF4], &mut buf[..1])
            .expect("read");
        assert_eq!(buf[0], 0);
    }

    #[test]
    fn set_values_are_clamped_to_the_parts_range() {
        let sensor = Bme280::new();
        sensor.set_celsius(150.0);
        sensor.set_humidity(130.0);
        let mut driver = Driver::new(board_with(&sensor), 0x76).expect("probe");
        let (t, _, h) = driver.measure().expect("measure");
        assert!((t - 85.0).abs() < 0.02, "{t}");
        assert!((h - 100.0).abs() < 0.1, "{h}");
    }
}
