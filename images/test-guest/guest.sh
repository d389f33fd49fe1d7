# Shell helpers of the test guest, sourced by /init (so the command loop has them too).
# They hold the facts boards/qemu-x86-test.toml relies on: one gpio-sim chip of 28 lines whose
# lines 4, 17, 22, 23, 24 and 27 are named GPIO4 ... GPIO27 (offset = the Pi's BCM number),
# and the TMP102-like I2C chip of i2c-stub at 0x48.

GPIO_SIM_DIR=/sys/kernel/config/gpio-sim/lichen
GPIO_SIM_LINES="4 17 22 23 24 27"
I2C_STUB_ADDR=0x48

# Creates the gpio-sim chip (or brings it back after gpio_unplug).
gpio_plug() {
  if [ ! -d "$GPIO_SIM_DIR" ]; then
    mkdir "$GPIO_SIM_DIR" "$GPIO_SIM_DIR/gpio-bank0" || return 1
    echo 28 >"$GPIO_SIM_DIR/gpio-bank0/num_lines"
    echo lichen-sim >"$GPIO_SIM_DIR/gpio-bank0/label"
    for n in $GPIO_SIM_LINES; do
      mkdir "$GPIO_SIM_DIR/gpio-bank0/line$n"
      echo "GPIO$n" >"$GPIO_SIM_DIR/gpio-bank0/line$n/name"
    done
  fi
  echo 1 >"$GPIO_SIM_DIR/live"
}

# Takes the chip away while it may be in use, as unplugging an expander would.
gpio_unplug() {
  echo 0 >"$GPIO_SIM_DIR/live"
}

# The sysfs directory of line N of the chip (holds `value` and `pull`).
gpio_line() {
  echo "/sys/devices/platform/$(cat "$GPIO_SIM_DIR/dev_name")/$(cat "$GPIO_SIM_DIR/gpio-bank0/chip_name")/sim_gpio$1"
}

# Prints the level the kernel sees on line N (an output's driven value, an input's pull).
gpio_value() {
  cat "$(gpio_line "$1")/value"
}

# Pulls line N up or down, as a button or a sensor outside would.
gpio_pull() {
  echo "pull-$2" >"$(gpio_line "$1")/pull"
}

# CLOCK_BOOTTIME in nanoseconds, at the kernel's 10 ms resolution of /proc/uptime.
uptime_ns() {
  read -r up _ </proc/uptime
  echo "${up%.*}${up#*.}0000000"
}
