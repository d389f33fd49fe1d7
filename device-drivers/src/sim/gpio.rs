//! A simulated gpiochip: named lines, requested as inputs or outputs like the real uAPI.
//!
//! Inputs are driven from outside ([`SimChip::drive`]), outputs observed ([`SimChip::level`],
//! [`SimChip::history`]). Inputs with edge detection queue [`EdgeEvent`]s stamped by the chip's
//! clock; debounce follows the kernel's rule: a change counts only once it has held for the
//! debounce period, and the event carries the time the period ended.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use embedded_hal::digital::{ErrorType, InputPin, OutputPin, StatefulOutputPin};
use embedded_hal_async::digital::Wait;

use crate::{
    Bias, Drive, Edge, EdgeDetection, EdgeEvent, Error, InputConfig, Level, OutputConfig, Result,
};

/// Output changes kept per line for [`SimChip::history`].
const HISTORY_LIMIT: usize = 1024;
/// Edge events kept per line before the oldest are dropped (the kernel's buffer also overflows).
const EVENT_LIMIT: usize = 1024;

/// A simulated gpiochip. Cheap to clone: clones share the same lines.
#[derive(Clone)]
pub struct SimChip {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    state: Mutex<ChipState>,
    changed: Condvar,
}

struct ChipState {
    clock: Clock,
    removed: bool,
    next_request: u64,
    lines: Vec<LineState>,
    /// Tasks waiting in [`Wait`] for something to change on the chip; woken (and forgotten)
    /// at every change, as the condition variable's blocked threads are.
    wakers: Vec<Waker>,
}

enum Clock {
    /// Nanoseconds since the chip was made.
    Real(Instant),
    /// Set by the test through [`SimChip::advance`].
    Manual(u64),
}

impl Clock {
    fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(start) => u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Clock::Manual(t) => *t,
        }
    }
}

struct LineState {
    name: String,
    /// Level forced from outside (a button, a wire); `None` leaves the bias to decide.
    external: Option<Level>,
    request: Option<Request>,
    /// The level the consumer sees: the output value, or the (debounced) input level.
    level: Level,
    /// An input change waiting out its debounce period: (new level, time it started).
    pending: Option<(Level, u64)>,
    events: VecDeque<EdgeEvent>,
    seqno: u32,
    dropped_events: u64,
    /// Times a consumer looked for a queued edge event on this line (`try_event`,
    /// `read_event`), to tell an event-driven reader from a polling one.
    event_reads: u64,
    history: VecDeque<(u64, Level)>,
    /// Rising and falling changes of the (debounced) level since the line was made, whether
    /// or not the request reports them as events: what [`Wait`]'s edge waits look at.
    changes: [u64; 2],
}

struct Request {
    id: u64,
    consumer: String,
    kind: RequestKind,
}

enum RequestKind {
    Output {
        active_low: bool,
        drive: Drive,
    },
    Input {
        bias: Option<Bias>,
        active_low: bool,
        edge: Option<EdgeDetection>,
        debounce_ns: u64,
    },
}

impl RequestKind {
    fn input(config: &InputConfig) -> RequestKind {
        RequestKind::Input {
            bias: config.bias,
            active_low: config.active_low,
            edge: config.edge,
            debounce_ns: config
                .debounce
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        }
    }
}

impl LineState {
    fn raw_input(&self) -> Level {
        let bias = match &self.request {
            Some(Request {
                kind: RequestKind::Input { bias, .. },
                ..
            }) => *bias,
            _ => None,
        };
        self.external.unwrap_or(match bias {
            Some(Bias::PullUp) => Level::High,
            _ => Level::Low,
        })
    }

    /// Commit a pending debounced change whose period has ended by `now`.
    fn settle(&mut self, now: u64) {
        let Some(RequestKind::Input {
            edge, debounce_ns, ..
        }) = self.request.as_ref().map(|r| &r.kind)
        else {
            return;
        };
        let (edge, debounce_ns) = (*edge, *debounce_ns);
        if let Some((level, since)) = self.pending {
            let at = since.saturating_add(debounce_ns);
            if now >= at {
                self.pending = None;
                self.commit(level, at, edge);
            }
        }
    }

    /// The raw input level may have changed at `now`.
    fn input_changed(&mut self, now: u64) {
        self.settle(now);
        let Some(RequestKind::Input {
            edge, debounce_ns, ..
        }) = self.request.as_ref().map(|r| &r.kind)
        else {
            self.level = self.raw_input();
            return;
        };
        let (edge, debounce_ns) = (*edge, *debounce_ns);
        let raw = self.raw_input();
        if debounce_ns == 0 {
            if raw != self.level {
                self.commit(raw, now, edge);
            }
        } else if raw == self.level {
            // Back where it was before the period ended: a glitch, dropped.
            self.pending = None;
        } else if self.pending.is_none() {
            self.pending = Some((raw, now));
        }
    }

    fn commit(&mut self, level: Level, at: u64, edge: Option<EdgeDetection>) {
        if level == self.level {
            return;
        }
        self.level = level;
        let kind = if level.is_high() {
            Edge::Rising
        } else {
            Edge::Falling
        };
        self.changes[usize::from(!level.is_high())] += 1;
        if edge.is_some_and(|e| e.matches(kind)) {
            self.seqno = self.seqno.wrapping_add(1);
            if self.events.len() >= EVENT_LIMIT {
                self.events.pop_front();
                self.dropped_events += 1;
            }
            self.events.push_back(EdgeEvent {
                edge: kind,
                timestamp_ns: at,
                seqno: self.seqno,
            });
        }
    }

    fn record_output(&mut self, now: u64, level: Level) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back((now, level));
        self.level = level;
    }
}

impl SimChip {
    /// A chip named `name` whose lines carry `labels`, in offset order; timestamps come from
    /// the real monotonic clock.
    pub fn new<I, S>(name: impl Into<String>, labels: I) -> SimChip
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_clock(name.into(), labels, Clock::Real(Instant::now()))
    }

    /// Like [`SimChip::new`], but time stands still until [`SimChip::advance`] moves it, so a
    /// test controls every timestamp and debounce period exactly.
    pub fn with_manual_clock<I, S>(name: impl Into<String>, labels: I) -> SimChip
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_clock(name.into(), labels, Clock::Manual(0))
    }

    fn with_clock<I, S>(name: String, labels: I, clock: Clock) -> SimChip
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let lines = labels
            .into_iter()
            .map(|l| LineState {
                name: l.into(),
                external: None,
                request: None,
                level: Level::Low,
                pending: None,
                events: VecDeque::new(),
                seqno: 0,
                dropped_events: 0,
                event_reads: 0,
                history: VecDeque::new(),
                changes: [0, 0],
            })
            .collect();
        SimChip {
            shared: Arc::new(Shared {
                name,
                state: Mutex::new(ChipState {
                    clock,
                    removed: false,
                    next_request: 1,
                    lines,
                    wakers: Vec::new(),
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// The chip's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The line labels, in offset order.
    pub fn labels(&self) -> Vec<String> {
        self.lock().lines.iter().map(|l| l.name.clone()).collect()
    }

    /// The chip clock's current time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.lock().clock.now_ns()
    }

    /// Move a manual clock forward by `by` (no effect on a real clock). Debounce periods that
    /// end within the step are committed as events.
    pub fn advance(&self, by: Duration) {
        let mut st = self.lock();
        if let Clock::Manual(t) = &mut st.clock {
            *t = t.saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX));
        }
        let now = st.clock.now_ns();
        for line in &mut st.lines {
            line.settle(now);
        }
        self.notify(st);
    }

    /// Drive a line from outside, as a button or a wire would. On an input this may produce
    /// an edge event; on an output it is recorded and only shows once the output is released.
    pub fn drive(&self, label: &str, level: Level) -> Result<()> {
        self.set_external(label, Some(level))
    }

    /// Stop driving a line from outside: it falls back to its bias (pull-up high, else low).
    pub fn release_drive(&self, label: &str) -> Result<()> {
        self.set_external(label, None)
    }

    fn set_external(&self, label: &str, level: Option<Level>) -> Result<()> {
        let mut st = self.lock();
        let now = st.clock.now_ns();
        let line = Self::line_mut(&mut st, &self.shared.name, label)?;
        line.external = level;
        if !matches!(
            line.request,
            Some(Request {
                kind: RequestKind::Output { .. },
                ..
            })
        ) {
            line.input_changed(now);
        }
        self.notify(st);
        Ok(())
    }

    /// The physical level of a line as an observer on the wire sees it: an output's driven
    /// value, or an input's (debounced) level.
    pub fn level(&self, label: &str) -> Result<Level> {
        let mut st = self.lock();
        let now = st.clock.now_ns();
        let line = Self::line_mut(&mut st, &self.shared.name, label)?;
        line.settle(now);
        Ok(match line.request {
            Some(Request {
                kind: RequestKind::Output { .. },
                ..
            }) => line.level,
            Some(_) => line.level,
            None => line.raw_input(),
        })
    }

    /// Every level an output has driven, with the chip time of each change (the last
    /// 1024 changes).
    pub fn history(&self, label: &str) -> Result<Vec<(u64, Level)>> {
        let mut st = self.lock();
        let line = Self::line_mut(&mut st, &self.shared.name, label)?;
        Ok(line.history.iter().copied().collect())
    }

    /// How many times a consumer looked for a queued edge event on a line (each
    /// `try_event` or `read_event` call): a reader that waits for events reads about once
    /// per edge, a polling one at every tick of its timer.
    pub fn event_reads(&self, label: &str) -> Result<u64> {
        let mut st = self.lock();
        let line = Self::line_mut(&mut st, &self.shared.name, label)?;
        Ok(line.event_reads)
    }

    /// The consumer holding a line, if it is requested.
    pub fn consumer(&self, label: &str) -> Result<Option<String>> {
        let mut st = self.lock();
        let line = Self::line_mut(&mut st, &self.shared.name, label)?;
        Ok(line.request.as_ref().map(|r| r.consumer.clone()))
    }

    /// Simulate the chip going away (unplugged USB expander, unbound driver): every pin
    /// requested from it fails from now on.
    pub fn remove(&self) {
        let mut st = self.lock();
        st.removed = true;
        self.notify(st);
    }

    /// Request a line as an output, driving `config.initial` at once.
    pub fn request_output(
        &self,
        label: &str,
        consumer: &str,
        config: &OutputConfig,
    ) -> Result<SimOutputPin> {
        let mut st = self.lock();
        let now = st.clock.now_ns();
        let id = st.next_request;
        st.next_request += 1;
        let (offset, line) = Self::free_line(&mut st, &self.shared.name, label)?;
        line.request = Some(Request {
            id,
            consumer: consumer.to_owned(),
            kind: RequestKind::Output {
                active_low: config.active_low,
                drive: config.drive,
            },
        });
        line.pending = None;
        line.record_output(now, config.initial);
        Ok(SimOutputPin {
            chip: self.clone(),
            offset,
            id,
            label: label.to_owned(),
        })
    }

    /// Request a line as an input, with bias, edge detection and debounce.
    pub fn request_input(
        &self,
        label: &str,
        consumer: &str,
        config: &InputConfig,
    ) -> Result<SimInputPin> {
        let mut st = self.lock();
        let id = st.next_request;
        st.next_request += 1;
        let (offset, line) = Self::free_line(&mut st, &self.shared.name, label)?;
        line.request = Some(Request {
            id,
            consumer: consumer.to_owned(),
            kind: RequestKind::input(config),
        });
        line.pending = None;
        line.events.clear();
        line.level = line.raw_input();
        Ok(SimInputPin {
            chip: self.clone(),
            offset,
            id,
            label: label.to_owned(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChipState> {
        // A panic while holding the lock leaves plain data behind, still consistent enough
        // for a simulator; keep going rather than poison every later test step.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn line_mut<'a>(st: &'a mut ChipState, chip: &str, label: &str) -> Result<&'a mut LineState> {
        if st.removed {
            return Err(Error::Line {
                label: label.to_owned(),
                message: format!("gpiochip {chip} was removed"),
            });
        }
        st.lines
            .iter_mut()
            .find(|l| l.name == label)
            .ok_or_else(|| Error::LineNotFound {
                label: label.to_owned(),
                chips_searched: 1,
            })
    }

    fn free_line<'a>(
        st: &'a mut ChipState,
        chip: &str,
        label: &str,
    ) -> Result<(usize, &'a mut LineState)> {
        Self::line_mut(st, chip, label)?;
        let offset = st
            .lines
            .iter()
            .position(|l| l.name == label)
            .expect("line_mut just found this label");
        let line = &mut st.lines[offset];
        if let Some(r) = &line.request {
            return Err(Error::LineBusy {
                label: label.to_owned(),
                consumer: Some(r.consumer.clone()),
            });
        }
        Ok((offset, line))
    }

    /// Run `f` on this pin's line, after checking the chip is present and the request live.
    fn with_line<T>(
        &self,
        offset: usize,
        id: u64,
        label: &str,
        f: impl FnOnce(&mut LineState, u64) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.lock();
        if st.removed {
            return Err(Error::Line {
                label: label.to_owned(),
                message: format!("gpiochip {} was removed", self.shared.name),
            });
        }
        let now = st.clock.now_ns();
        let line = &mut st.lines[offset];
        if line.request.as_ref().map(|r| r.id) != Some(id) {
            return Err(Error::Line {
                label: label.to_owned(),
                message: "request was released".into(),
            });
        }
        let out = f(line, now);
        self.notify(st);
        out
    }

    fn release(&self, offset: usize, id: u64) {
        let mut st = self.lock();
        if let Some(line) = st.lines.get_mut(offset)
            && line.request.as_ref().map(|r| r.id) == Some(id)
        {
            line.request = None;
            line.pending = None;
            line.events.clear();
        }
        self.notify(st);
    }

    /// Something changed: wake the threads blocked in `read_event` and the tasks waiting in
    /// [`Wait`], after letting go of the lock.
    fn notify(&self, mut st: MutexGuard<'_, ChipState>) {
        let wakers = std::mem::take(&mut st.wakers);
        drop(st);
        self.shared.changed.notify_all();
        for waker in wakers {
            waker.wake();
        }
    }
}

impl std::fmt::Debug for SimChip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimChip")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// A simulated line requested as an output. Released when dropped.
#[derive(Debug)]
pub struct SimOutputPin {
    chip: SimChip,
    offset: usize,
    id: u64,
    label: String,
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
    chip: SimChip,
    offset: usize,
    id: u64,
    label: String,
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
    chip: SimChip,
    offset: usize,
    id: u64,
    label: String,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
