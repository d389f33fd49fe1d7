//! The handles of requested lines: an output pin, an input pin, and an input's edge watch, with
//! the embedded-hal traits (blocking and async) they implement.

use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use embedded_hal::digital::{ErrorType, InputPin, OutputPin, StatefulOutputPin};
use embedded_hal_async::digital::Wait;

use super::{Clock, LineState, RequestKind, SimChip};
use crate::{Drive, EdgeEvent, Error, InputConfig, Level, Result};

/// A simulated line requested as an output. Released when dropped.
#[derive(Debug)]
pub struct SimOutputPin {
    pub(super) chip: SimChip,
    pub(super) offset: usize,
    pub(super) id: u64,
    pub(super) label: String,
}

impl SimOutputPin {
    /// The line's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Drive the physical level `level`.
    pub fn set_level(&mut self, level: Level) -> Result<()> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, now| {
                line.record_output(now, level);
                Ok(())
            })
    }

    /// The physical level this output drives.
    pub fn driven_level(&self) -> Result<Level> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, _| Ok(line.level))
    }

    /// Drive the logical state: active is low when the line is active-low.
    pub fn set_active(&mut self, active: bool) -> Result<()> {
        let active_low = self.active_low()?;
        self.set_level(Level::from(active != active_low))
    }

    /// The drive mode the line was requested with.
    pub fn drive(&self) -> Result<Drive> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, _| {
                Ok(match line.request.as_ref().map(|r| &r.kind) {
                    Some(RequestKind::Output { drive, .. }) => *drive,
                    _ => Drive::PushPull,
                })
            })
    }

    fn active_low(&self) -> Result<bool> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, _| {
                Ok(matches!(
                    line.request.as_ref().map(|r| &r.kind),
                    Some(RequestKind::Output {
                        active_low: true,
                        ..
                    })
                ))
            })
    }
}

impl Drop for SimOutputPin {
    fn drop(&mut self) {
        self.chip.release(self.offset, self.id);
    }
}

impl ErrorType for SimOutputPin {
    type Error = Error;
}

impl OutputPin for SimOutputPin {
    fn set_low(&mut self) -> Result<()> {
        self.set_level(Level::Low)
    }

    fn set_high(&mut self) -> Result<()> {
        self.set_level(Level::High)
    }
}

impl StatefulOutputPin for SimOutputPin {
    fn is_set_high(&mut self) -> Result<bool> {
        Ok(self.driven_level()?.is_high())
    }

    fn is_set_low(&mut self) -> Result<bool> {
        Ok(!self.driven_level()?.is_high())
    }
}

/// A simulated line requested as an input. Released when dropped.
#[derive(Debug)]
pub struct SimInputPin {
    pub(super) chip: SimChip,
    pub(super) offset: usize,
    pub(super) id: u64,
    pub(super) label: String,
}

impl SimInputPin {
    /// The line's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The physical (debounced) level.
    pub fn level(&self) -> Result<Level> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, now| {
                line.settle(now);
                Ok(line.level)
            })
    }

    /// Changes the request's bias, active-low, edge detection and debounce in place, as the
    /// kernel's line-config ioctl does: the line stays requested by this consumer, queued
    /// events stay queued, and a change still waiting out its debounce period keeps its start
    /// under the new period (committed at once when the new period is zero).
    pub fn reconfigure(&mut self, config: &InputConfig) -> Result<()> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, now| {
                line.settle(now);
                if let Some(request) = line.request.as_mut() {
                    request.kind = RequestKind::input(config);
                }
                if config.debounce.is_none_or(|d| d.is_zero()) {
                    line.pending = None;
                }
                line.input_changed(now);
                Ok(())
            })
    }

    /// Take the next edge event if one is queued, without waiting.
    pub fn try_event(&mut self) -> Result<Option<EdgeEvent>> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, now| {
                line.event_reads = line.event_reads.saturating_add(1);
                line.settle(now);
                Ok(line.events.pop_front())
            })
    }

    /// Wait up to `timeout` for the next edge event. `Ok(None)` means the time ran out.
    pub fn read_event(&mut self, timeout: Duration) -> Result<Option<EdgeEvent>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.chip.lock();
        if let Some(line) = st.lines.get_mut(self.offset) {
            line.event_reads = line.event_reads.saturating_add(1);
        }
        loop {
            if st.removed {
                return Err(Error::Line {
                    label: self.label.clone(),
                    message: format!("gpiochip {} was removed", self.chip.shared.name),
                });
            }
            let now = st.clock.now_ns();
            let real_clock = matches!(st.clock, Clock::Real(_));
            let line = &mut st.lines[self.offset];
            if line.request.as_ref().map(|r| r.id) != Some(self.id) {
                return Err(Error::Line {
                    label: self.label.clone(),
                    message: "request was released".into(),
                });
            }
            line.settle(now);
            if let Some(ev) = line.events.pop_front() {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // On the real clock a pending debounce ends by itself: wake up for it.
            let mut wait = left;
            if let (true, Some((_, since)), Some(RequestKind::Input { debounce_ns, .. })) = (
                real_clock,
                line.pending,
                line.request.as_ref().map(|r| &r.kind),
            ) {
                let due = since.saturating_add(*debounce_ns).saturating_sub(now);
                wait = wait.min(Duration::from_nanos(due));
            }
            st = self
                .chip
                .shared
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Edge events dropped because the queue was full.
    pub fn dropped_events(&self) -> Result<u64> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, _| {
                Ok(line.dropped_events)
            })
    }

    /// Whether the line is logically active (low when requested active-low).
    pub fn is_active(&self) -> Result<bool> {
        self.chip
            .with_line(self.offset, self.id, &self.label, |line, now| {
                line.settle(now);
                let active_low = matches!(
                    line.request.as_ref().map(|r| &r.kind),
                    Some(RequestKind::Input {
                        active_low: true,
                        ..
                    })
                );
                Ok(line.level.is_high() != active_low)
            })
    }
}

impl Drop for SimInputPin {
    fn drop(&mut self) {
        self.chip.release(self.offset, self.id);
    }
}

impl ErrorType for SimInputPin {
    type Error = Error;
}

impl InputPin for SimInputPin {
    fn is_high(&mut self) -> Result<bool> {
        Ok(self.level()?.is_high())
    }

    fn is_low(&mut self) -> Result<bool> {
        Ok(!self.level()?.is_high())
    }
}

impl SimInputPin {
    /// A handle that waits for this line's edge events without holding the pin, so that one
    /// task can sleep until an edge while another reads the pin: see [`SimEdgeWatch`].
    pub fn edge_watch(&self) -> SimEdgeWatch {
        SimEdgeWatch {
            chip: self.chip.clone(),
            offset: self.offset,
            id: self.id,
            label: self.label.clone(),
        }
    }
}

/// Waits for edge events queued on a simulated input line, apart from the pin that takes
/// them ([`SimInputPin::try_event`]): woken by the chip's change notifications and by the
/// end of a debounce period, never by a timer of its own.
#[derive(Debug)]
pub struct SimEdgeWatch {
    pub(super) chip: SimChip,
    pub(super) offset: usize,
    pub(super) id: u64,
    pub(super) label: String,
}

impl SimEdgeWatch {
    /// Waits, without blocking a thread, until the line has an edge event queued. Fails
    /// once the request is released or the chip removed, so a watcher ends with its pin.
    pub async fn queued(&mut self) -> Result<()> {
        std::future::poll_fn(|cx| {
            let mut st = self.chip.lock();
            if st.removed {
                return Poll::Ready(Err(Error::Line {
                    label: self.label.clone(),
                    message: format!("gpiochip {} was removed", self.chip.shared.name),
                }));
            }
            let now = st.clock.now_ns();
            let real_clock = matches!(st.clock, Clock::Real(_));
            let line = &mut st.lines[self.offset];
            if line.request.as_ref().map(|r| r.id) != Some(self.id) {
                return Poll::Ready(Err(Error::Line {
                    label: self.label.clone(),
                    message: "request was released".into(),
                }));
            }
            line.settle(now);
            if !line.events.is_empty() {
                return Poll::Ready(Ok(()));
            }
            wake_at_debounce_end(real_clock, line, now, cx.waker());
            st.wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// On the real clock a pending debounce period ends by itself, with nobody to notify: wakes
/// `waker` when it is due.
fn wake_at_debounce_end(real_clock: bool, line: &LineState, now: u64, waker: &Waker) {
    if let (true, Some((_, since)), Some(RequestKind::Input { debounce_ns, .. })) = (
        real_clock,
        line.pending,
        line.request.as_ref().map(|r| &r.kind),
    ) {
        let due = Duration::from_nanos(since.saturating_add(*debounce_ns).saturating_sub(now));
        let waker = waker.clone();
        std::thread::spawn(move || {
            std::thread::sleep(due);
            waker.wake();
        });
    }
}

/// What a [`Wait`] call waits for.
#[derive(Debug, Clone, Copy)]
enum WaitFor {
    Level(Level),
    /// More changes of these kinds (rising, falling) than seen when the wait began.
    Change {
        rising: bool,
        falling: bool,
    },
}

impl SimInputPin {
    /// Waits, without blocking a thread, until `what` holds on this line. Debounce applies:
    /// a change counts once it has held for the debounce period.
    async fn wait_for(&mut self, what: WaitFor) -> Result<()> {
        let mut start: Option<[u64; 2]> = None;
        std::future::poll_fn(|cx| {
            let mut st = self.chip.lock();
            if st.removed {
                return Poll::Ready(Err(Error::Line {
                    label: self.label.clone(),
                    message: format!("gpiochip {} was removed", self.chip.shared.name),
                }));
            }
            let now = st.clock.now_ns();
            let real_clock = matches!(st.clock, Clock::Real(_));
            let line = &mut st.lines[self.offset];
            if line.request.as_ref().map(|r| r.id) != Some(self.id) {
                return Poll::Ready(Err(Error::Line {
                    label: self.label.clone(),
                    message: "request was released".into(),
                }));
            }
            line.settle(now);
            let done = match what {
                WaitFor::Level(level) => line.level == level,
                WaitFor::Change { rising, falling } => {
                    let seen = *start.get_or_insert(line.changes);
                    (rising && line.changes[0] > seen[0]) || (falling && line.changes[1] > seen[1])
                }
            };
            if done {
                return Poll::Ready(Ok(()));
            }
            wake_at_debounce_end(real_clock, line, now, cx.waker());
            st.wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// embedded-hal-async's `Wait`: the task is woken by the change (a drive from outside, the
/// end of a debounce period), no thread is blocked. Edge waits count changes of the
/// debounced level from the moment of the call, whether or not the line reports events.
impl Wait for SimInputPin {
    async fn wait_for_high(&mut self) -> Result<()> {
        self.wait_for(WaitFor::Level(Level::High)).await
    }

    async fn wait_for_low(&mut self) -> Result<()> {
        self.wait_for(WaitFor::Level(Level::Low)).await
    }

    async fn wait_for_rising_edge(&mut self) -> Result<()> {
        self.wait_for(WaitFor::Change {
            rising: true,
            falling: false,
        })
        .await
    }

    async fn wait_for_falling_edge(&mut self) -> Result<()> {
        self.wait_for(WaitFor::Change {
            rising: false,
            falling: true,
        })
        .await
    }

    async fn wait_for_any_edge(&mut self) -> Result<()> {
        self.wait_for(WaitFor::Change {
            rising: true,
            falling: true,
        })
        .await
    }
}
