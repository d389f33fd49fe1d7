use embedded_hal::digital::InputPin;
use embedded_hal_async::digital::Wait;

use super::*;

#[test]
fn active_low_maps_levels_and_edges_both_ways() {
    assert_eq!(to_value(Level::High, false), Value::Active);
    assert_eq!(to_value(Level::High, true), Value::Inactive);
    assert_eq!(to_level(Value::Active, true), Level::Low);
    assert_eq!(
        to_kernel_edge(EdgeDetection::Rising, true),
        line::EdgeDetection::FallingEdge
    );
    assert_eq!(
        from_kernel_edge(line::EdgeKind::Rising, true),
        Edge::Falling
    );
    assert_eq!(
        from_kernel_edge(line::EdgeKind::Rising, false),
        Edge::Rising
    );
}

#[test]
fn errno_maps_to_named_errors() {
    let e = gpio_error(
        "/dev/gpiochip0",
        "GPIO17",
        gpiocdev::Error::Os(gpiocdev_uapi::Errno(libc_errno::EACCES)),
    );
    assert_eq!(e.to_string(), "/dev/gpiochip0: permission denied");
    let e = gpio_error(
        "/dev/gpiochip0",
        "GPIO17",
        gpiocdev::Error::Os(gpiocdev_uapi::Errno(libc_errno::EBUSY)),
    );
    assert_eq!(e.to_string(), "line \"GPIO17\" is already in use");
}

/// Against a real kernel: needs a gpiochip with a free line named like the
/// `LICHEN_TEST_GPIO_LINE` variable (default `GPIO17`), such as a gpio-sim or gpio-mockup
/// chip in the QEMU test guest. Skips, saying why, when the host has no gpiochip.
#[test]
fn real_kernel_output_then_input_round_trip() {
    let chips = chip_paths().unwrap_or_default();
    if chips.is_empty() {
        eprintln!(
            "skipped: no gpiochip on this host (load gpio-sim or gpio-mockup, or run in the \
                 QEMU test guest)"
        );
        return;
    }
    let label = std::env::var("LICHEN_TEST_GPIO_LINE").unwrap_or_else(|_| "GPIO17".into());
    let spec = LineSpec::Label(label.clone());
    let mut out = match LinuxOutputPin::request(&spec, "lichen-test", &OutputConfig::default()) {
        Ok(p) => p,
        Err(Error::LineNotFound { .. }) => {
            eprintln!(
                "skipped: no line labelled {label} on {} gpiochip(s)",
                chips.len()
            );
            return;
        }
        Err(e) => panic!("requesting {label}: {e}"),
    };
    out.set_high().expect("set high");
    assert!(out.is_set_high().expect("read back"));
    out.set_low().expect("set low");
    assert!(out.is_set_low().expect("read back"));
    drop(out);
    let mut inp = LinuxInputPin::request(
        &spec,
        "lichen-test",
        &InputConfig {
            edge: Some(EdgeDetection::Both),
            ..Default::default()
        },
    )
    .expect("request input");
    inp.is_high().expect("read");
    assert_eq!(
        inp.read_event(Duration::from_millis(10)).expect("wait"),
        None,
        "nobody drives the line"
    );
    // The async Wait: on the request's fd in tokio's reactor; nobody drives the line, so
    // the edge wait is still pending when the timeout ends it, and a level wait for the
    // level the line has returns at once.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let waited = tokio::time::timeout(Duration::from_millis(20), inp.wait_for_any_edge()).await;
        assert!(waited.is_err(), "no edge, no wake-up: {waited:?}");
        if inp.is_high().expect("read") {
            inp.wait_for_high().await.expect("already high");
        } else {
            inp.wait_for_low().await.expect("already low");
        }
    });
}
