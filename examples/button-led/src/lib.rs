//! # button-led
//!
//! Lights the output pin its deployment names `led` while the input pin named `button` is
//! pressed (pulled low), driven by a `gpio-edge` trigger: each edge event sets the LED from
//! the edge (falling: on, rising: off), and the last edge's kernel timestamp and sequence
//! number are kept in the key-value bucket (`last-edge-ns`, `edges`).
//!
//! ```toml
//! [[workloads]]
//! name = "button-led"
//! module = "button-led.wasm"
//! triggers = [{ gpio-edge = "button", edge = "both", debounce = "5ms" }]
//! gpio = [
//!   { name = "button", pin = "GPIO27", mode = "input", bias = "pull-up" },
//!   { name = "led", pin = "GPIO17", mode = "output", initial = "low" },
//! ]
//! ```
//!
//! - Commands: `led` replies `on` or `off`; `set-led` with payload `on` or `off` drives the LED
//!   (until the next edge) and replies its new state; `button` replies `pressed` or
//!   `released`. These are what a KubeEdge Device of protocol `lichen` sends for its `led` and
//!   `button` properties (`docs/kubeedge.md`).
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p button-led` in `examples/`.

use crate::lichen::device::gpio;
use crate::lichen::device::types::{Edge, GpioEdge};
use crate::wasi::keyvalue::{atomics, store};

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

struct ButtonLed;

impl Guest for ButtonLed {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        // The LED follows the button's level at start, before any edge.
        let pressed = button_pressed()?;
        set_led(pressed)
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        match event {
            Event::GpioEdge(edge) => on_edge(&edge).map(|()| None),
            Event::Command(command) => match command.name.as_str() {
                "led" => {
                    let on = led()?.is_set_high().map_err(|e| format!("{e:?}"))?;
                    Ok(Some(on_off(on)))
                }
                "set-led" => {
                    let on = match command.payload.as_slice() {
                        b"on" | b"true" | b"1" => true,
                        b"off" | b"false" | b"0" => false,
                        other => {
                            return Err(format!(
                                "set-led takes on or off, not {:?}",
                                String::from_utf8_lossy(other)
                            ));
                        }
                    };
                    set_led(on)?;
                    Ok(Some(on_off(on)))
                }
                "button" => Ok(Some(if button_pressed()? {
                    b"pressed".to_vec()
                } else {
                    b"released".to_vec()
                })),
                other => Err(format!(
                    "unknown command {other:?}: expected led, set-led or button"
                )),
            },
            Event::Tick(_) | Event::Stop => Ok(None),
        }
    }
}

fn on_off(on: bool) -> Vec<u8> {
    if on { b"on".to_vec() } else { b"off".to_vec() }
}

fn led() -> Result<gpio::DigitalOutPin, String> {
    gpio::get_output("led").map_err(|e| format!("cannot open \"led\": {e:?}"))
}

fn button_pressed() -> Result<bool, String> {
    let button = gpio::get_input("button").map_err(|e| format!("cannot open \"button\": {e:?}"))?;
    let level = button.read_level().map_err(|e| format!("{e:?}"))?;
    Ok(level == gpio::Level::Low)
}

fn set_led(on: bool) -> Result<(), String> {
    let level = if on {
        gpio::Level::High
    } else {
        gpio::Level::Low
    };
    led()?.set_level(level).map_err(|e| format!("{e:?}"))
}

fn on_edge(edge: &GpioEdge) -> Result<(), String> {
    if edge.name != "button" {
        return Ok(());
    }
    set_led(edge.edge == Edge::Falling)?;
    let bucket =
        store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))?;
    bucket
        .set("last-edge-ns", edge.timestamp_ns.to_string().as_bytes())
        .map_err(|e| format!("cannot store the timestamp: {e:?}"))?;
    atomics::increment(&bucket, "edges", 1).map_err(|e| format!("cannot count edges: {e:?}"))?;
    Ok(())
}

export!(ButtonLed);
