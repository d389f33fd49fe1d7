//! A whole simulated board built from a `sim` profile.

use std::collections::BTreeMap;

use crate::board::{Backend, BoardProfile, SimI2cModel, SimSpiModel};
use crate::sim::{
    Bme280, Mcp3008, SimChip, SimI2cBus, SimInputPin, SimOutputPin, SimSpiDevice, Tmp102,
};
use crate::{Error, InputConfig, LineSpec, OutputConfig, Result, SpiConfig};

/// The simulated devices of a board profile whose backend is `sim`: one gpiochip carrying every
/// pin's line, the SPI devices with their models, the I2C buses with their targets.
///
/// Pins and buses are asked for by the names the profile gives them, as grants name them.
#[derive(Debug, Clone)]
pub struct SimBoard {
    profile: BoardProfile,
    chip: SimChip,
    spi: BTreeMap<String, (SimSpiDevice, Mcp3008)>,
    i2c: BTreeMap<String, SimI2cBus>,
    tmp102: BTreeMap<(String, u16), Tmp102>,
    bme280: BTreeMap<(String, u16), Bme280>,
}

impl SimBoard {
    /// Build the simulated devices `profile` describes. Fails if the profile is not simulated.
    pub fn new(profile: &BoardProfile) -> Result<Self> {
        if profile.backend != Backend::Sim {
            return Err(Error::profile(
                &profile.name,
                "is not a simulated board (backend is not \"sim\")",
            ));
        }
        let labels = profile.pins.iter().map(|p| match &p.line {
            LineSpec::Label(l) => l.clone(),
            // Validation rejects chip/offset lines on simulated boards.
            LineSpec::ChipOffset { .. } => p.name.clone(),
        });
        let chip = SimChip::new(format!("{}-gpio", profile.name), labels);
        let mut spi = BTreeMap::new();
        for bus in &profile.spi {
            let Some(SimSpiModel::Mcp3008) = bus.sim else {
                continue;
            };
            let adc = Mcp3008::new();
            let dev = SimSpiDevice::new(bus.name.clone(), SpiConfig::default(), adc.clone());
            spi.insert(bus.name.clone(), (dev, adc));
        }
        let mut i2c = BTreeMap::new();
        let mut tmp102 = BTreeMap::new();
        let mut bme280 = BTreeMap::new();
        for bus in &profile.i2c {
            let sim_bus = SimI2cBus::new(bus.name.clone());
            for target in &bus.sim {
                let address = u8::try_from(target.address).map_err(|_| {
                    Error::profile(&profile.name, format!("bad address {}", target.address))
                })?;
                match target.model {
                    SimI2cModel::Tmp102 => {
                        let sensor = Tmp102::new();
                        sim_bus.attach(address, sensor.clone())?;
                        tmp102.insert((bus.name.clone(), target.address), sensor);
                    }
                    SimI2cModel::Bme280 => {
                        let sensor = Bme280::new();
                        sim_bus.attach(address, sensor.clone())?;
                        bme280.insert((bus.name.clone(), target.address), sensor);
                    }
                }
            }
            i2c.insert(bus.name.clone(), sim_bus);
        }
        Ok(SimBoard {
            profile: profile.clone(),
            chip,
            spi,
            i2c,
            tmp102,
            bme280,
        })
    }

    /// The built-in `sim` profile's board.
    pub fn default_board() -> Result<Self> {
        Self::new(&BoardProfile::builtin("sim")?)
    }

    /// The profile the board was built from.
    pub fn profile(&self) -> &BoardProfile {
        &self.profile
    }

    /// The gpiochip, to drive inputs and observe outputs by line label.
    pub fn chip(&self) -> &SimChip {
        &self.chip
    }

    fn label(&self, pin: &str) -> Result<String> {
        match self.profile.pin(pin).map(|p| &p.line) {
            Some(LineSpec::Label(l)) => Ok(l.clone()),
            _ => Err(Error::profile(
                &self.profile.name,
                format!("has no pin \"{pin}\""),
            )),
        }
    }

    /// Request the header pin `pin` (a profile pin name) as an output.
    pub fn output(&self, pin: &str, consumer: &str, config: &OutputConfig) -> Result<SimOutputPin> {
        self.chip
            .request_output(&self.label(pin)?, consumer, config)
    }

    /// Request the header pin `pin` (a profile pin name) as an input.
    pub fn input(&self, pin: &str, consumer: &str, config: &InputConfig) -> Result<SimInputPin> {
        self.chip.request_input(&self.label(pin)?, consumer, config)
    }

    /// Open the SPI device `bus` (`spi0.0`) with `config`; refuses a clock above the bus's
    /// `max_hz`.
    pub fn spi(&self, bus: &str, config: SpiConfig) -> Result<SimSpiDevice> {
        let profile_bus = self.profile.spi_bus(bus).ok_or_else(|| {
            Error::profile(&self.profile.name, format!("has no SPI bus \"{bus}\""))
        })?;
        if let Some(max) = profile_bus.max_hz
            && config.max_hz > max
        {
            return Err(Error::Bus {
                bus: bus.to_owned(),
                message: format!(
                    "{} Hz asked, the bus allows at most {max} Hz",
                    config.max_hz
                ),
            });
        }
        let (dev, _) = self.spi.get(bus).ok_or_else(|| Error::Bus {
            bus: bus.to_owned(),
            message: "no simulated device on this chip-select".into(),
        })?;
        Ok(dev.with_config(config))
    }

    /// Open the I2C bus `bus` (`i2c-1`).
    pub fn i2c(&self, bus: &str) -> Result<SimI2cBus> {
        self.i2c
            .get(bus)
            .cloned()
            .ok_or_else(|| Error::profile(&self.profile.name, format!("has no I2C bus \"{bus}\"")))
    }

    /// Simulate the SPI device `bus` going away while in use: every handle opened on it
    /// fails from now on (see [`SimSpiDevice::remove`]).
    pub fn remove_spi(&self, bus: &str) -> Result<()> {
        let (dev, _) = self.spi.get(bus).ok_or_else(|| {
            Error::profile(&self.profile.name, format!("has no SPI bus \"{bus}\""))
        })?;
        dev.remove();
        Ok(())
    }

    /// Simulate the I2C bus `bus` going away while in use: every handle opened on it fails
    /// from now on (see [`SimI2cBus::remove`]).
    pub fn remove_i2c(&self, bus: &str) -> Result<()> {
        self.i2c(bus)?.remove();
        Ok(())
    }

    /// The MCP3008 on SPI device `bus`, to set its inputs.
    pub fn mcp3008(&self, bus: &str) -> Option<Mcp3008> {
        self.spi.get(bus).map(|(_, adc)| adc.clone())
    }

    /// The TMP102 at `address` on I2C bus `bus`, to set its temperature.
    pub fn tmp102(&self, bus: &str, address: u16) -> Option<Tmp102> {
        self.tmp102.get(&(bus.to_owned(), address)).cloned()
    }

    /// The BME280 at `address` on I2C bus `bus`, to set its environment.
    pub fn bme280(&self, bus: &str, address: u16) -> Option<Bme280> {
        self.bme280.get(&(bus.to_owned(), address)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use embedded_hal::digital::{InputPin, OutputPin};
    use embedded_hal::i2c::I2c;
    use embedded_hal::spi::SpiDevice;

    use super::*;
    use crate::Level;

    /// Code written once against the traits, as a device function's driver would be.
    fn blink<P: OutputPin>(led: &mut P) -> Result<(), P::Error> {
        led.set_high()?;
        led.set_low()
    }

    fn read_adc<S: SpiDevice>(spi: &mut S, ch: u8) -> Result<u16, S::Error> {
        let mut rx = [0u8; 3];
        spi.transfer(&mut rx, &[0x01, 0x80 | ch << 4, 0x00])?;
        Ok(u16::from(rx[1] & 0x03) << 8 | u16::from(rx[2]))
    }

    fn read_temp<I: I2c>(i2c: &mut I, address: u8) -> Result<f32, I::Error> {
        let mut buf = [0u8; 2];
        i2c.write_read(address, &[0x00], &mut buf)?;
        Ok(Tmp102::decode(buf))
    }

    #[test]
    fn the_default_sim_board_has_the_pi_header_and_its_peripherals() {
        let board = SimBoard::default_board().expect("sim profile");
        let mut led = board
            .output("GPIO17", "blinky", &OutputConfig::default())
            .expect("pin");
        blink(&mut led).expect("blink");
        assert_eq!(
            board.chip().history("GPIO17").expect("line").len(),
            3,
            "initial, high, low"
        );

        let mut button = board
            .input("GPIO27", "button", &InputConfig::default())
            .expect("pin");
        board.chip().drive("GPIO27", Level::High).expect("drive");
        assert!(button.is_high().expect("read"));

        board
            .mcp3008("spi0.0")
            .expect("adc")
            .set_channel(0, 777)
            .expect("ch");
        let mut spi = board.spi("spi0.0", SpiConfig::default()).expect("bus");
        assert_eq!(read_adc(&mut spi, 0).expect("read"), 777);

        board
            .tmp102("i2c-1", 0x48)
            .expect("sensor")
            .set_celsius(22.5);
        let mut i2c = board.i2c("i2c-1").expect("bus");
        assert_eq!(read_temp(&mut i2c, 0x48).expect("read"), 22.5);

        // The BME280 beside it at 0x76: chip id, then a forced measurement.
        assert!(board.bme280("i2c-1", 0x76).is_some());
        let mut id = [0u8];
        i2c.write_read(0x76u8, &[0xD0], &mut id).expect("read");
        assert_eq!(id, [0x60]);
    }

    #[test]
    fn unknown_pins_buses_and_fast_clocks_are_refused() {
        let board = SimBoard::default_board().expect("sim profile");
        let e = board
            .output("GPIO99", "t", &OutputConfig::default())
            .expect_err("no such pin");
        assert_eq!(
            e.to_string(),
            "board profile \"sim\": has no pin \"GPIO99\""
        );
        let e = board.i2c("i2c-7").expect_err("no such bus");
        assert_eq!(
            e.to_string(),
            "board profile \"sim\": has no I2C bus \"i2c-7\""
        );
        let e = board
            .spi(
                "spi0.0",
                SpiConfig {
                    max_hz: 10_000_000,
                    ..SpiConfig::default()
                },
            )
            .expect_err("too fast");
        assert_eq!(
            e.to_string(),
            "spi0.0: 10000000 Hz asked, the bus allows at most 3600000 Hz"
        );
    }

    #[test]
    fn removing_a_bus_fails_the_handles_already_open_and_leaves_the_others() {
        let board = SimBoard::default_board().expect("sim profile");
        let mut spi = board.spi("spi0.0", SpiConfig::default()).expect("bus");
        let mut i2c = board.i2c("i2c-1").expect("bus");
        board.remove_spi("spi0.0").expect("on the board");
        assert_eq!(
            read_adc(&mut spi, 0).expect_err("gone").to_string(),
            "spi0.0: the SPI device was removed"
        );
        assert!(read_temp(&mut i2c, 0x48).is_ok(), "I2C is another bus");
        board.remove_i2c("i2c-1").expect("on the board");
        assert_eq!(
            read_temp(&mut i2c, 0x48).expect_err("gone").to_string(),
            "i2c-1: the I2C bus was removed"
        );
        assert!(board.remove_spi("spi1.0").is_err());
    }

    #[test]
    fn a_linux_profile_is_not_a_sim_board() {
        let e = SimBoard::new(&BoardProfile::builtin("rpi5").expect("valid")).expect_err("linux");
        assert_eq!(
            e.to_string(),
            "board profile \"rpi5\": is not a simulated board (backend is not \"sim\")"
        );
    }
}
