//! The Linux device path on a real kernel: one boot of the test guest (`images/test-guest/`,
//! Debian's kernel under QEMU/TCG with gpio-sim, a mock MCP3008 behind spidev and i2c-stub)
//! runs the example device functions through the static `lichen`, and the test checks from
//! outside, over the serial console, what the kernel did: output line values, the input
//! line's pull, edge events with kernel timestamps, SPI and SMBus reads; then the bad inputs
//! that need a real kernel: a chip unplugged while in use, a device node missing at start,
//! a device node the agent may not open.
//!
//! Run: `cargo test -p lichen-tests --test kernel_guest -- --nocapture` (prints the build,
//! boot and total times). The first run builds the guest (kernel modules, static lichen);
//! later runs reuse it from `<cargo target dir>/guest` (or `$LICHEN_GUEST_CACHE`). Without
//! QEMU it fails, unless `LICHEN_TEST_ALLOW_MISSING` lists `qemu`.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lichen_agent::api::types::{KvEntry, WorkloadState, WorkloadStatus};
use lichen_tests::guest::{self, Guest};

/// The agent's client inside the guest, on the root daemon's socket.
const LICHEN: &str = "lichen --socket /run/lichen.sock";

/// The gpio-sim offsets (BCM numbers) of the pins the deployment uses.
const BUTTON: u32 = 27;
const LED: u32 = 22;
const BLINKY: u32 = 17;

fn ps(g: &mut Guest, client: &str) -> Result<Vec<WorkloadStatus>> {
    let out = g.sh(&format!("{client} --json ps"))?;
    serde_json::from_str(&out).with_context(|| format!("ps printed {out:?}"))
}

fn status(g: &mut Guest, client: &str, name: &str) -> Result<WorkloadStatus> {
    ps(g, client)?
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no workload {name} in ps"))
}

/// One key of a workload's default bucket, if set.
fn kv(g: &mut Guest, name: &str, key: &str) -> Result<Option<String>> {
    let (code, out) = g.run(&format!("{LICHEN} --json kv {name} {key}"))?;
    if code != 0 {
        bail!("kv {name} {key} exited with {code}: {out}");
    }
    let entries: Vec<KvEntry> =
        serde_json::from_str(out.trim()).with_context(|| format!("kv printed {out:?}"))?;
    Ok(entries.into_iter().next().map(|e| e.value))
}

/// Polls `kv` until `key` of `name` equals `want`.
fn wait_kv(g: &mut Guest, name: &str, key: &str, want: &str) -> Result<()> {
    g.wait_until(
        &format!("{LICHEN} --json kv {name} {key}"),
        &format!("{name}'s {key} = {want}"),
        |out| {
            serde_json::from_str::<Vec<KvEntry>>(out)
                .ok()
                .and_then(|e| e.into_iter().next())
                .is_some_and(|e| e.value == want)
        },
    )?;
    Ok(())
}

/// Polls the kernel's value of gpio-sim line `line` until it is `want`.
fn wait_line(g: &mut Guest, line: u32, want: u32, why: &str) -> Result<()> {
    g.wait_until(&format!("gpio_value {line}"), why, |out| {
        out == want.to_string()
    })?;
    Ok(())
}

/// Polls `ps` until `name` satisfies `done`; returns that status.
fn wait_status(
    g: &mut Guest,
    client: &str,
    name: &str,
    what: &str,
    done: impl Fn(&WorkloadStatus) -> bool,
) -> Result<WorkloadStatus> {
    let out = g.wait_until(&format!("{client} --json ps"), what, |out| {
        serde_json::from_str::<Vec<WorkloadStatus>>(out)
            .ok()
            .and_then(|rows| rows.into_iter().find(|s| s.name == name))
            .is_some_and(|s| done(&s))
    })?;
    let rows: Vec<WorkloadStatus> = serde_json::from_str(&out)?;
    Ok(rows
        .into_iter()
        .find(|s| s.name == name)
        .expect("wait_until checked it is there"))
}

/// Starts the root daemon on the stored deployment (or none) and waits for its socket.
fn start_agent(g: &mut Guest) -> Result<()> {
    g.sh(
        "lichen --socket /run/lichen.sock run --config /etc/lichen.toml \
         --state-dir /var/lib/lichen --empty >>/tmp/lichen.log 2>&1 & echo $! >/tmp/lichen.pid",
    )?;
    g.wait_until(
        "test -S /run/lichen.sock && echo up",
        "the agent's socket",
        |o| o == "up",
    )?;
    Ok(())
}

/// Stops the root daemon (SIGTERM) and waits until it is gone.
fn stop_agent(g: &mut Guest) -> Result<()> {
    g.sh("kill $(cat /tmp/lichen.pid)")?;
    g.wait_until(
        "kill -0 $(cat /tmp/lichen.pid) 2>/dev/null && echo running || echo gone",
        "the agent to exit",
        |o| o == "gone",
    )?;
    g.sh("rm -f /run/lichen.sock")?;
    Ok(())
}

#[test]
fn device_functions_drive_a_real_kernel_and_bad_devices_fail_only_their_workload() {
    if !lichen_tests::tools::qemu_present() {
        return;
    }
    let started = Instant::now();
    let wasm: Vec<(&str, PathBuf)> = ["button-led", "blinky", "adc-sampler", "env-sensor"]
        .into_iter()
        .map(|name| (name, lichen_tests::guest(name)))
        .collect();
    let image = guest::build(&wasm).expect("the test guest builds");
    let mut g = Guest::boot(&image).expect("the test guest boots");
    eprintln!(
        "test guest: build {:.1?}, boot to init {:.1?}, kernel {} ({})",
        image.build_time,
        g.boot_time,
        g.kernel,
        image.dir.display()
    );
    let result = scenarios(&mut g);
    if let Err(e) = &result {
        let log = g.run("tail -n 30 /tmp/lichen.log; tail -n 20 /tmp/user.log; dmesg | tail -n 20");
        panic!(
            "{e:#}\n--- guest agent log and dmesg ---\n{}\n--- console tail ---\n{}",
            log.map(|(_, o)| o).unwrap_or_default(),
            g.console_tail(2000)
        );
    }
    eprintln!("test guest: whole test {:.1?}", started.elapsed());
}

fn scenarios(g: &mut Guest) -> Result<()> {
    // The nodes the board profile names exist, made by the kernel's simulators.
    assert!(
        g.kernel.ends_with("-amd64"),
        "a Debian kernel: {}",
        g.kernel
    );
    g.sh("test -c /dev/gpiochip0 && test -c /dev/spidev0.0 && test -c /dev/i2c-0")?;
    let adapter = g.sh("cat /sys/class/i2c-dev/i2c-0/name")?;
    assert!(
        adapter.starts_with("SMBus stub"),
        "i2c-0 is i2c-stub: {adapter}"
    );

    // The sensors' registers, set from outside: a TMP102 temperature of 0x194 steps
    // (25.25 °C: bytes 0x19 0x40, left-aligned 12 bits) and 700 on the ADC's channel 0.
    g.sh("i2cset -y 0 0x48 0x00 0x19 && i2cset -y 0 0x48 0x01 0x40")?;
    g.sh("echo 700,256,768,1023,0,100,200,300 >/sys/module/spi_lichen_mock/parameters/codes")?;

    start_agent(g)?;
    let out = g.sh(&format!("{LICHEN} deploy /guest/devices.toml"))?;
    assert!(out.contains("deployment version 1 applied"), "{out}");
    for name in ["button-led", "blinky", "adc-sampler", "env-sensor"] {
        wait_status(g, LICHEN, name, &format!("{name} running"), |s| {
            s.state == WorkloadState::Running && s.uptime_ms.is_some()
        })?;
    }

    button_led_follows_the_input_line(g)?;
    blinky_toggles_its_output_line(g)?;
    adc_sampler_reads_the_mock_mcp3008_over_spidev(g)?;
    env_sensor_reads_i2c_stub_through_smbus(g)?;
    an_unplugged_chip_fails_its_workloads_and_the_agent_stays_up(g)?;
    a_missing_node_at_start_fails_only_its_workload_naming_it(g)?;
    a_node_the_agent_may_not_open_fails_only_its_workload(g)?;
    Ok(())
}

fn button_led_follows_the_input_line(g: &mut Guest) -> Result<()> {
    // The grant's bias reached the kernel: gpio-sim pulls the button line up, so it reads 1
    // and the LED (on while pressed) is off.
    assert_eq!(
        g.sh(&format!("gpio_value {BUTTON}"))?,
        "1",
        "pull-up bias applied"
    );
    assert_eq!(g.sh(&format!("gpio_value {LED}"))?, "0", "LED off at start");

    // Press: pull the line down. The kernel's edge event reaches the function, which lights
    // the LED; the event's timestamp is the kernel's CLOCK_MONOTONIC, between the two
    // readings of the guest's clock around the press.
    let before: u64 = g.sh("uptime_ns")?.parse()?;
    g.sh(&format!("gpio_pull {BUTTON} down"))?;
    wait_line(g, LED, 1, "the LED to light on press")?;
    wait_kv(g, "button-led", "edges", "1")?;
    let after: u64 = g.sh("uptime_ns")?.parse()?;
    let pressed: u64 = kv(g, "button-led", "last-edge-ns")?
        .context("no last-edge-ns after an edge")?
        .parse()?;
    // /proc/uptime has 10 ms steps: `after` may be up to 10 ms below the true time.
    assert!(
        before <= pressed && pressed <= after + 10_000_000,
        "edge timestamp {pressed} ns is not between {before} and {after} ns of the guest's clock"
    );

    // Release: the rising edge turns the LED off, with a later timestamp.
    g.sh(&format!("gpio_pull {BUTTON} up"))?;
    wait_line(g, LED, 0, "the LED to go off on release")?;
    wait_kv(g, "button-led", "edges", "2")?;
    let released: u64 = kv(g, "button-led", "last-edge-ns")?
        .context("no last-edge-ns")?
        .parse()?;
    assert!(released > pressed, "{released} after {pressed}");
    assert_eq!(g.sh(&format!("{LICHEN} send button-led led"))?, "off");
    Ok(())
}

fn blinky_toggles_its_output_line(g: &mut Guest) -> Result<()> {
    let mut seen = [false; 2];
    g.wait_until(
        &format!("gpio_value {BLINKY}"),
        "GPIO17 to be seen both low and high",
        |out| {
            match out {
                "0" => seen[0] = true,
                "1" => seen[1] = true,
                _ => {}
            }
            seen == [true, true]
        },
    )?;
    Ok(())
}

fn adc_sampler_reads_the_mock_mcp3008_over_spidev(g: &mut Guest) -> Result<()> {
    let transfers = |g: &mut Guest| -> Result<u64> {
        Ok(
            g.sh("cat /sys/module/spi_lichen_mock/parameters/transfers")?
                .parse()?,
        )
    };
    wait_kv(g, "adc-sampler", "code", "700")?;
    let first = transfers(g)?;
    // A new input voltage on channel 0: the next samples follow it.
    g.sh("echo 123,256,768,1023,0,100,200,300 >/sys/module/spi_lichen_mock/parameters/codes")?;
    wait_kv(g, "adc-sampler", "code", "123")?;
    let later = transfers(g)?;
    assert!(
        later > first,
        "the kernel's SPI controller answered transfers ({first} then {later})"
    );
    let reply = g.sh(&format!("{LICHEN} send adc-sampler read"))?;
    assert_eq!(reply, "123");
    Ok(())
}

fn env_sensor_reads_i2c_stub_through_smbus(g: &mut Guest) -> Result<()> {
    // i2c-stub has no plain I2C transfers: the register read goes out as an SMBus I2C-block
    // read, the only way this adapter can answer it.
    wait_kv(g, "env-sensor", "celsius", "25.25")?;
    g.sh("i2cset -y 0 0x48 0x00 0x1a")?;
    wait_kv(g, "env-sensor", "celsius", "26.25")?;
    assert_eq!(g.sh(&format!("{LICHEN} send env-sensor read"))?, "26.25");
    // 0x49 is granted but no chip is there: the kernel's answer reaches the function as an
    // error naming the bus (i2c-stub answers an empty address with ENODEV where a real
    // adapter says ENXIO, so it is not told apart as a NACK); 0x50, outside the grant,
    // never leaves the host.
    let out = g.sh(&format!("{LICHEN} send env-sensor read-at 0x49"))?;
    assert_eq!(out, "bus: i2c-0: /dev/i2c-0: No such device (os error 19)");
    let out = g.sh(&format!("{LICHEN} send env-sensor read-at 0x50"))?;
    assert_eq!(out, "address-not-allowed(80)");
    Ok(())
}

fn an_unplugged_chip_fails_its_workloads_and_the_agent_stays_up(g: &mut Guest) -> Result<()> {
    let sampler_before = status(g, LICHEN, "adc-sampler")?.events_handled;
    g.sh("gpio_unplug")?;
    g.sh("test ! -e /dev/gpiochip0")?;
    // The LED's line went with the chip: the function's next use of it fails, naming it.
    let (code, out) = g.run(&format!("{LICHEN} send button-led led"))?;
    assert_ne!(code, 0, "led must fail once the chip is gone: {out}");
    assert!(
        out.contains("GPIO22") && out.contains("/dev/gpiochip0 was removed"),
        "{out}"
    );
    // The agent answers, and the SPI workload keeps sampling.
    wait_status(
        g,
        LICHEN,
        "adc-sampler",
        "adc-sampler still sampling",
        |s| s.state == WorkloadState::Running && s.events_handled > sampler_before + 2,
    )?;
    // blinky's next tick fails: the agent logs the function's error (naming the pin and
    // the chip), and the workload stays up for the chip to come back.
    let line = g.wait_until(
        &format!("{LICHEN} logs blinky | grep 'event failed' | tail -n 1"),
        "blinky to log the lost line",
        |out| out.contains("/dev/gpiochip0 was removed"),
    )?;
    assert!(line.contains("GPIO17"), "{line}");
    let blinky = status(g, LICHEN, "blinky")?;
    assert_eq!(blinky.traps, 0, "an error, not a trap: {blinky:?}");
    Ok(())
}

fn a_missing_node_at_start_fails_only_its_workload_naming_it(g: &mut Guest) -> Result<()> {
    stop_agent(g)?;
    // The chip comes back (gpio-sim may give it a new number: lines are found by label).
    g.sh("gpio_plug")?;
    g.sh("mv /dev/spidev0.0 /tmp/spidev0.0.away")?;
    start_agent(g)?;
    let sampler = wait_status(g, LICHEN, "adc-sampler", "adc-sampler to fail", |s| {
        s.state != WorkloadState::Running && s.last_error.is_some()
    })?;
    let error = sampler.last_error.unwrap_or_default();
    assert!(
        error.contains(
            "cannot open SPI device spi0.0 for grant \"adc\": /dev/spidev0.0: no such device node"
        ),
        "{error}"
    );
    // The others run, on the real devices: the button still lights the LED.
    for name in ["button-led", "blinky", "env-sensor"] {
        wait_status(g, LICHEN, name, &format!("{name} running"), |s| {
            s.state == WorkloadState::Running
        })?;
    }
    g.sh(&format!("gpio_pull {BUTTON} down"))?;
    wait_line(g, LED, 1, "the LED to light on the replugged chip")?;
    g.sh(&format!("gpio_pull {BUTTON} up"))?;
    wait_line(g, LED, 0, "the LED to go off on the replugged chip")?;

    // The node comes back: the workload's next restart opens it.
    g.sh("mv /tmp/spidev0.0.away /dev/spidev0.0")?;
    wait_status(g, LICHEN, "adc-sampler", "adc-sampler to recover", |s| {
        s.state == WorkloadState::Running && s.events_handled > 0
    })?;
    Ok(())
}

fn a_node_the_agent_may_not_open_fails_only_its_workload(g: &mut Guest) -> Result<()> {
    stop_agent(g)?;
    // An agent running as uid 1000: the GPIO chips and spidev are its, i2c-0 is not.
    g.sh("mkdir -p /tmp/user-state && chown 1000:1000 /tmp/user-state")?;
    g.sh(
        "chown 1000:1000 /dev/gpiochip* /dev/spidev0.0 && chmod 0600 /dev/gpiochip* /dev/spidev0.0",
    )?;
    g.sh("chown 0:0 /dev/i2c-0 && chmod 0600 /dev/i2c-0")?;
    g.sh(
        "su -s /bin/sh lichen -c 'exec lichen --socket /tmp/user.sock run --config /etc/lichen.toml \
         --state-dir /tmp/user-state --deploy /guest/devices.toml >/tmp/user.log 2>&1' & \
         echo $! >/tmp/user.pid",
    )?;
    let user = "lichen --socket /tmp/user.sock";
    g.wait_until(
        "test -S /tmp/user.sock && echo up",
        "the user agent's socket",
        |o| o == "up",
    )?;
    let uid = g.sh("awk '/^Uid:/ { print $2 }' /proc/$(cat /tmp/user.pid)/status")?;
    assert_eq!(uid, "1000", "the agent runs without root");
    let sensor = wait_status(g, user, "env-sensor", "env-sensor to fail", |s| {
        s.state != WorkloadState::Running && s.last_error.is_some()
    })?;
    let error = sensor.last_error.unwrap_or_default();
    assert!(
        error
            .contains("cannot open I2C bus i2c-0 for grant \"env\": /dev/i2c-0: permission denied"),
        "{error}"
    );
    for name in ["button-led", "blinky", "adc-sampler"] {
        wait_status(g, user, name, &format!("{name} running as uid 1000"), |s| {
            s.state == WorkloadState::Running
        })?;
    }
    g.sh("kill $(cat /tmp/user.pid)")?;
    Ok(())
}
