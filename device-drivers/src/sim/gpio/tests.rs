use super::*;
use embedded_hal::digital::{InputPin, OutputPin, StatefulOutputPin};
use embedded_hal_async::digital::Wait;
use std::task::Poll;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn output_is_observable_and_stateful() {
    let chip = SimChip::with_manual_clock("sim", ["GPIO17"]);
    let mut led = chip
        .request_output(
            "GPIO17",
            "blinky",
            &OutputConfig {
                initial: Level::High,
                ..Default::default()
            },
        )
        .expect("free line");
    assert_eq!(chip.level("GPIO17").expect("line"), Level::High);
    chip.advance(ms(10));
    led.set_low().expect("set");
    assert!(led.is_set_low().expect("read back"));
    led.toggle().expect("toggle");
    assert_eq!(chip.level("GPIO17").expect("line"), Level::High);
    assert_eq!(
        chip.history("GPIO17").expect("line"),
        vec![
            (0, Level::High),
            (10_000_000, Level::Low),
            (10_000_000, Level::High)
        ]
    );
    assert_eq!(
        chip.consumer("GPIO17").expect("line").as_deref(),
        Some("blinky")
    );
}

#[test]
fn active_low_output_inverts_the_logical_state_only() {
    let chip = SimChip::new("sim", ["LED"]);
    let mut led = chip
        .request_output(
            "LED",
            "t",
            &OutputConfig {
                initial: Level::High,
                active_low: true,
                ..Default::default()
            },
        )
        .expect("free line");
    led.set_active(true).expect("set");
    assert_eq!(chip.level("LED").expect("line"), Level::Low);
}

#[test]
fn line_held_twice_is_busy_and_free_again_after_drop() {
    let chip = SimChip::new("sim", ["GPIO17"]);
    let pin = chip
        .request_output("GPIO17", "door", &OutputConfig::default())
        .expect("free");
    let err = chip
        .request_input("GPIO17", "other", &InputConfig::default())
        .expect_err("busy");
    assert_eq!(
        err.to_string(),
        "line \"GPIO17\" is already in use (held by \"door\")"
    );
    drop(pin);
    chip.request_input("GPIO17", "other", &InputConfig::default())
        .expect("free after drop");
}

#[test]
fn unknown_line_is_named() {
    let chip = SimChip::new("sim", ["GPIO17"]);
    let err = chip
        .request_output("GPIO99", "t", &OutputConfig::default())
        .expect_err("no such line");
    assert_eq!(err.to_string(), "line \"GPIO99\" not found on any gpiochip");
}

#[test]
fn input_follows_drive_and_bias() {
    let chip = SimChip::new("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                bias: Some(Bias::PullUp),
                ..Default::default()
            },
        )
        .expect("free");
    assert!(btn.is_high().expect("read"), "pull-up reads high");
    chip.drive("BTN", Level::Low).expect("drive");
    assert!(btn.is_low().expect("read"));
    chip.release_drive("BTN").expect("release");
    assert!(btn.is_high().expect("read"));
}

#[test]
fn input_edges_produce_events_with_increasing_timestamps() {
    let chip = SimChip::with_manual_clock("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Both),
                ..Default::default()
            },
        )
        .expect("free");
    chip.advance(ms(1));
    chip.drive("BTN", Level::High).expect("drive");
    chip.advance(ms(1));
    chip.drive("BTN", Level::Low).expect("drive");
    let a = btn.read_event(ms(0)).expect("read").expect("rising");
    let b = btn.read_event(ms(0)).expect("read").expect("falling");
    assert_eq!(
        (a.edge, a.timestamp_ns, a.seqno),
        (Edge::Rising, 1_000_000, 1)
    );
    assert_eq!(
        (b.edge, b.timestamp_ns, b.seqno),
        (Edge::Falling, 2_000_000, 2)
    );
    assert!(b.timestamp_ns > a.timestamp_ns);
    assert_eq!(btn.read_event(ms(0)).expect("read"), None);
}

#[test]
fn falling_only_detection_ignores_rising_edges() {
    let chip = SimChip::with_manual_clock("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Falling),
                ..Default::default()
            },
        )
        .expect("free");
    chip.drive("BTN", Level::High).expect("drive");
    chip.drive("BTN", Level::Low).expect("drive");
    let ev = btn.try_event().expect("read").expect("falling");
    assert_eq!(ev.edge, Edge::Falling);
    assert_eq!(btn.try_event().expect("read"), None);
}

#[test]
fn debounce_suppresses_a_glitch_and_reports_a_held_change() {
    let chip = SimChip::with_manual_clock("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Both),
                debounce: Some(ms(5)),
                ..Default::default()
            },
        )
        .expect("free");
    // A 2 ms glitch: shorter than the 5 ms debounce, no event, level unchanged.
    chip.advance(ms(10));
    chip.drive("BTN", Level::High).expect("drive");
    chip.advance(ms(2));
    chip.drive("BTN", Level::Low).expect("drive");
    chip.advance(ms(10));
    assert_eq!(btn.try_event().expect("read"), None);
    assert!(btn.is_low().expect("read"));
    // A press held for 8 ms: one event, stamped when the debounce period ended.
    chip.drive("BTN", Level::High).expect("drive");
    chip.advance(ms(3));
    assert!(btn.is_low().expect("read"), "not yet stable");
    chip.advance(ms(5));
    let ev = btn.try_event().expect("read").expect("rising");
    assert_eq!(ev.edge, Edge::Rising);
    assert_eq!(ev.timestamp_ns, 27_000_000);
    assert!(btn.is_high().expect("read"));
    assert_eq!(btn.try_event().expect("read"), None);
}

#[test]
fn reconfigure_keeps_the_request_and_its_queued_edges_and_applies_the_new_debounce() {
    let chip = SimChip::with_manual_clock("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Both),
                ..Default::default()
            },
        )
        .expect("free");
    chip.advance(ms(1));
    chip.drive("BTN", Level::High).expect("drive");
    let slow = InputConfig {
        edge: Some(EdgeDetection::Both),
        debounce: Some(ms(5)),
        ..Default::default()
    };
    btn.reconfigure(&slow).expect("reconfigured");
    assert_eq!(chip.consumer("BTN").expect("line").as_deref(), Some("t"));
    let queued = btn.try_event().expect("read").expect("kept across it");
    assert_eq!(queued.edge, Edge::Rising);
    // The new period holds: a change counts after 5 ms.
    chip.drive("BTN", Level::Low).expect("drive");
    chip.advance(ms(3));
    assert_eq!(btn.try_event().expect("read"), None);
    // Back to no debounce while a change waits: it counts at once.
    btn.reconfigure(&InputConfig {
        edge: Some(EdgeDetection::Both),
        ..Default::default()
    })
    .expect("reconfigured");
    let ev = btn.try_event().expect("read").expect("falling");
    assert_eq!(ev.edge, Edge::Falling);
    assert!(btn.is_low().expect("read"));
}

#[test]
fn read_event_waits_for_a_drive_from_another_thread() {
    let chip = SimChip::new("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Rising),
                ..Default::default()
            },
        )
        .expect("free");
    let driver = chip.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(ms(20));
        driver.drive("BTN", Level::High)
    });
    let ev = btn.read_event(Duration::from_secs(5)).expect("read");
    t.join().expect("thread").expect("drive");
    assert_eq!(ev.map(|e| e.edge), Some(Edge::Rising));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

#[test]
fn wait_for_level_returns_at_once_when_it_holds_and_else_on_the_drive() {
    let chip = SimChip::new("sim", ["BTN"]);
    let mut btn = chip
        .request_input("BTN", "t", &InputConfig::default())
        .expect("free");
    runtime().block_on(async {
        btn.wait_for_low().await.expect("already low");
        let driver = chip.clone();
        let drive = tokio::spawn(async move {
            tokio::time::sleep(ms(10)).await;
            driver.drive("BTN", Level::High)
        });
        btn.wait_for_high().await.expect("driven high");
        drive.await.expect("task").expect("drive");
        assert!(btn.is_high().expect("read"));
    });
}

#[test]
fn wait_for_edges_counts_changes_after_the_call_only() {
    use std::future::Future;
    use std::task::Context;

    let chip = SimChip::with_manual_clock("sim", ["BTN"]);
    // No edge detection requested: Wait does not need the event queue.
    let mut btn = chip
        .request_input("BTN", "t", &InputConfig::default())
        .expect("free");
    chip.drive("BTN", Level::High).expect("drive");
    chip.drive("BTN", Level::Low).expect("drive");
    // Polled by hand, so each step happens exactly between two polls.
    let mut cx = Context::from_waker(Waker::noop());
    {
        let mut falling = std::pin::pin!(btn.wait_for_falling_edge());
        assert!(
            falling.as_mut().poll(&mut cx).is_pending(),
            "the changes before the call do not count"
        );
        chip.drive("BTN", Level::High).expect("drive");
        assert!(
            falling.as_mut().poll(&mut cx).is_pending(),
            "a rising edge is not a falling one"
        );
        chip.drive("BTN", Level::Low).expect("drive");
        assert!(matches!(
            falling.as_mut().poll(&mut cx),
            Poll::Ready(Ok(()))
        ));
    }
    {
        let mut any = std::pin::pin!(btn.wait_for_any_edge());
        assert!(any.as_mut().poll(&mut cx).is_pending());
        chip.drive("BTN", Level::High).expect("drive");
        assert!(matches!(any.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }
    assert!(btn.is_high().expect("read"));
}

#[test]
fn wait_respects_debounce_on_the_real_clock() {
    let chip = SimChip::new("sim", ["BTN"]);
    let mut btn = chip
        .request_input(
            "BTN",
            "t",
            &InputConfig {
                edge: Some(EdgeDetection::Rising),
                debounce: Some(ms(20)),
                ..Default::default()
            },
        )
        .expect("free");
    // Nobody advances the real clock: the wait must wake by itself when the period ends.
    let pressed_ns = chip.now_ns();
    chip.drive("BTN", Level::High).expect("drive");
    runtime()
        .block_on(btn.wait_for_rising_edge())
        .expect("after the debounce period");
    assert!(btn.is_high().expect("read"));
    // The change counted exactly when its period ended, by the chip's own clock.
    let ev = btn.try_event().expect("read").expect("rising");
    assert_eq!(ev.edge, Edge::Rising);
    assert!(
        ev.timestamp_ns >= pressed_ns + 20_000_000,
        "the edge is stamped at the end of the debounce period: {} vs press at {pressed_ns}",
        ev.timestamp_ns
    );
}

#[test]
fn wait_fails_when_the_chip_is_removed() {
    let chip = SimChip::new("sim", ["BTN"]);
    let mut btn = chip
        .request_input("BTN", "t", &InputConfig::default())
        .expect("free");
    let remover = chip.clone();
    let err = runtime().block_on(async {
        let remove = async {
            tokio::task::yield_now().await;
            remover.remove();
        };
        let (waited, ()) = tokio::join!(btn.wait_for_high(), remove);
        waited.expect_err("gone")
    });
    assert_eq!(err.to_string(), "line \"BTN\": gpiochip sim was removed");
}

#[test]
fn removed_chip_fails_every_pin() {
    let chip = SimChip::new("sim", ["GPIO17"]);
    let mut led = chip
        .request_output("GPIO17", "t", &OutputConfig::default())
        .expect("free");
    chip.remove();
    let err = led.set_high().expect_err("gone");
    assert_eq!(err.to_string(), "line \"GPIO17\": gpiochip sim was removed");
}
