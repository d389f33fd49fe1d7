//! A simulated gpiochip: named lines, requested as inputs or outputs like the real uAPI.
//!
//! Inputs are driven from outside ([`SimChip::drive`]), outputs observed ([`SimChip::level`],
//! [`SimChip::history`]). Inputs with edge detection queue [`EdgeEvent`]s stamped by the chip's
//! clock; debounce follows the kernel's rule: a change counts only once it has held for the
//! debounce period, and the event carries the time the period ended.
//!
//! The pin handles are in `gpio/pins.rs`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::{
    Bias, Drive, Edge, EdgeDetection, EdgeEvent, Error, InputConfig, Level, OutputConfig, Result,
};

mod pins;

pub use pins::{SimEdgeWatch, SimInputPin, SimOutputPin};

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

#[cfg(test)]
mod tests;
