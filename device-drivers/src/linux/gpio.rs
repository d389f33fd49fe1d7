//! GPIO lines over the Linux GPIO character device, uAPI v2 (`gpiocdev`).
//!
//! Lines are found by label across every gpiochip, never by chip number: numbering moves
//! between kernels (the Pi 5's header chip went from gpiochip4 to gpiochip0 in 6.6.47), labels
//! come from the device tree and stay.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use embedded_hal::digital::{ErrorType, OutputPin, StatefulOutputPin};
use gpiocdev::line::{self, Value};

use crate::{
    Bias, Drive, Edge, EdgeDetection, EdgeEvent, Error, InputConfig, Level, LineSpec, OutputConfig,
    Result,
};

/// A line located on a chip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineLocation {
    /// The gpiochip's device node (`/dev/gpiochip0`).
    pub chip: PathBuf,
    /// The line's offset on that chip.
    pub offset: u32,
    /// The line's label (may be empty for lines found by offset).
    pub label: String,
}

/// The gpiochip device nodes on this host, in name order (empty when there are none).
pub fn chip_paths() -> Result<Vec<PathBuf>> {
    gpiocdev::chip::chips().map_err(|e| gpio_error("/dev", "", e))
}

/// Find the line labelled `label`, looking through every gpiochip. Fails if no chip has it,
/// or if two chips do (picking one would be a guess).
pub fn find_line(label: &str) -> Result<LineLocation> {
    let chips = chip_paths()?;
    let mut found = Vec::new();
    let mut denied = None;
    for path in &chips {
        let chip = match gpiocdev::Chip::from_path(path) {
            Ok(c) => c,
            Err(e) => {
                // One chip we cannot open must not hide a line on another; remember it in
                // case the line is found nowhere.
                denied.get_or_insert_with(|| gpio_error(path, label, e));
                continue;
            }
        };
        if let Some(info) = chip.find_line_info(label) {
            found.push(LineLocation {
                chip: path.clone(),
                offset: info.offset,
                label: label.to_owned(),
            });
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(match denied {
            Some(e @ Error::PermissionDenied { .. }) => e,
            _ => Error::LineNotFound {
                label: label.to_owned(),
                chips_searched: chips.len(),
            },
        }),
        _ => Err(Error::LineAmbiguous {
            label: label.to_owned(),
            chips: found.iter().map(|l| l.chip.display().to_string()).collect(),
        }),
    }
}

/// Resolve a [`LineSpec`]: by label, or by chip label and offset.
pub fn locate(spec: &LineSpec) -> Result<LineLocation> {
    match spec {
        LineSpec::Label(label) => find_line(label),
        LineSpec::ChipOffset { chip, offset } => {
            for path in chip_paths()? {
                let Ok(c) = gpiocdev::Chip::from_path(&path) else {
                    continue;
                };
                let Ok(info) = c.info() else { continue };
                if info.label == *chip {
                    if *offset >= info.num_lines {
                        return Err(Error::Line {
                            label: spec.to_string(),
                            message: format!(
                                "{} has only {} lines",
                                path.display(),
                                info.num_lines
                            ),
                        });
                    }
                    let label = c.line_info(*offset).map(|i| i.name).unwrap_or_default();
                    return Ok(LineLocation {
                        chip: path,
                        offset: *offset,
                        label,
                    });
                }
            }
            Err(Error::ChipNotFound {
                label: chip.clone(),
            })
        }
    }
}

/// Turn a gpiocdev error on `chip` / line `label` into ours, naming the resource.
fn gpio_error(chip: impl AsRef<Path>, label: &str, e: gpiocdev::Error) -> Error {
    let errno = match &e {
        gpiocdev::Error::Os(errno) => Some(errno.0),
        gpiocdev::Error::Uapi(_, gpiocdev_uapi::Error::Os(errno)) => Some(errno.0),
        _ => None,
    };
    let chip = chip.as_ref().to_path_buf();
    match errno {
        Some(libc_errno::EBUSY) => Error::LineBusy {
            label: label.to_owned(),
            consumer: None,
        },
        Some(libc_errno::EACCES | libc_errno::EPERM) => Error::PermissionDenied { path: chip },
        Some(libc_errno::ENOENT) => Error::NodeMissing { path: chip },
        Some(libc_errno::ENODEV) => Error::Line {
            label: label.to_owned(),
            message: format!("{} was removed", chip.display()),
        },
        _ if label.is_empty() => Error::Io {
            path: chip,
            source: std::io::Error::other(e.to_string()),
        },
        _ => Error::Line {
            label: label.to_owned(),
            message: format!("{}: {e}", chip.display()),
        },
    }
}

/// The errno values we tell apart (Linux, every architecture we build for).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EBUSY: i32 = 16;
    pub const ENODEV: i32 = 19;
}

/// Who holds the line, for a busy error (best effort).
fn busy_consumer(loc: &LineLocation, err: Error) -> Error {
    match err {
        Error::LineBusy { label, .. } => {
            let consumer = gpiocdev::Chip::from_path(&loc.chip)
                .and_then(|c| c.line_info(loc.offset))
                .ok()
                .map(|i| i.consumer)
                .filter(|c| !c.is_empty());
            Error::LineBusy { label, consumer }
        }
        other => other,
    }
}

fn to_value(level: Level, active_low: bool) -> Value {
    if level.is_high() != active_low {
        Value::Active
    } else {
        Value::Inactive
    }
}

fn to_level(value: Value, active_low: bool) -> Level {
    Level::from((value == Value::Active) != active_low)
}

fn to_bias(b: Bias) -> line::Bias {
    match b {
        Bias::Disabled => line::Bias::Disabled,
        Bias::PullUp => line::Bias::PullUp,
        Bias::PullDown => line::Bias::PullDown,
    }
}

fn to_drive(d: Drive) -> line::Drive {
    match d {
        Drive::PushPull => line::Drive::PushPull,
        Drive::OpenDrain => line::Drive::OpenDrain,
        Drive::OpenSource => line::Drive::OpenSource,
    }
}

/// The kernel reports edges in logical terms (rising = to active); with active-low the
/// physical edge is the other one, both ways.
fn to_kernel_edge(e: EdgeDetection, active_low: bool) -> line::EdgeDetection {
    match (e, active_low) {
        (EdgeDetection::Both, _) => line::EdgeDetection::BothEdges,
        (EdgeDetection::Rising, false) | (EdgeDetection::Falling, true) => {
            line::EdgeDetection::RisingEdge
        }
        (EdgeDetection::Falling, false) | (EdgeDetection::Rising, true) => {
            line::EdgeDetection::FallingEdge
        }
    }
}

fn from_kernel_edge(kind: line::EdgeKind, active_low: bool) -> Edge {
    match (kind, active_low) {
        (line::EdgeKind::Rising, false) | (line::EdgeKind::Falling, true) => Edge::Rising,
        (line::EdgeKind::Falling, false) | (line::EdgeKind::Rising, true) => Edge::Falling,
    }
}

/// A line requested as an output. The kernel releases it when this is dropped.
#[derive(Debug)]
pub struct LinuxOutputPin {
    req: gpiocdev::Request,
    loc: LineLocation,
    name: String,
    active_low: bool,
}

impl LinuxOutputPin {
    /// Request the line `spec` as an output for `consumer`, driving `config.initial` at once.
    pub fn request(spec: &LineSpec, consumer: &str, config: &OutputConfig) -> Result<Self> {
        let loc = locate(spec)?;
        let name = spec.to_string();
        let mut b = gpiocdev::Request::builder();
        b.on_chip(&loc.chip)
            .with_consumer(consumer)
            .with_line(loc.offset)
            .as_output(to_value(config.initial, config.active_low))
            .with_drive(to_drive(config.drive));
        if config.active_low {
            b.as_active_low();
        }
        let req = b
            .request()
            .map_err(|e| busy_consumer(&loc, gpio_error(&loc.chip, &name, e)))?;
        Ok(LinuxOutputPin {
            req,
            loc,
            name,
            active_low: config.active_low,
        })
    }

    /// Where the line is.
    pub fn location(&self) -> &LineLocation {
        &self.loc
    }

    /// Drive the physical level `level`.
    pub fn set_level(&mut self, level: Level) -> Result<()> {
        self.req
            .set_value(self.loc.offset, to_value(level, self.active_low))
            .map_err(|e| gpio_error(&self.loc.chip, &self.name, e))
    }

    /// The physical level the kernel says the line drives.
    pub fn driven_level(&self) -> Result<Level> {
        self.req
            .value(self.loc.offset)
            .map(|v| to_level(v, self.active_low))
            .map_err(|e| gpio_error(&self.loc.chip, &self.name, e))
    }

    /// Drive the logical state: active is low when the line is active-low.
    pub fn set_active(&mut self, active: bool) -> Result<()> {
        self.set_level(Level::from(active != self.active_low))
    }
}

impl ErrorType for LinuxOutputPin {
    type Error = Error;
}

impl OutputPin for LinuxOutputPin {
    fn set_low(&mut self) -> Result<()> {
        self.set_level(Level::Low)
    }

    fn set_high(&mut self) -> Result<()> {
        self.set_level(Level::High)
    }
}

impl StatefulOutputPin for LinuxOutputPin {
    fn is_set_high(&mut self) -> Result<bool> {
        Ok(self.driven_level()?.is_high())
    }

    fn is_set_low(&mut self) -> Result<bool> {
        Ok(!self.driven_level()?.is_high())
    }
}

/// A line requested as an input, optionally with edge events. Released when dropped.
#[derive(Debug)]
pub struct LinuxInputPin {
    /// A duplicate of the request's fd, registered with tokio's reactor by the first
    /// [`Wait`] call (the duplicate shares the request's open file, so it is readable when an
    /// edge event is queued).
    readiness: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    req: gpiocdev::Request,
    loc: LineLocation,
    name: String,
    active_low: bool,
    edge: Option<EdgeDetection>,
}

impl LinuxInputPin {
    /// Request the line `spec` as an input for `consumer`, with bias, edge detection and
    /// debounce (done by the kernel, or by the chip where it can).
    pub fn request(spec: &LineSpec, consumer: &str, config: &InputConfig) -> Result<Self> {
        let loc = locate(spec)?;
        let name = spec.to_string();
        let mut b = gpiocdev::Request::builder();
        b.on_chip(&loc.chip)
            .with_consumer(consumer)
            .with_line(loc.offset)
            .as_input();
        if config.active_low {
            b.as_active_low();
        }
        if let Some(bias) = config.bias {
            b.with_bias(to_bias(bias));
        }
        if let Some(edge) = config.edge {
            b.with_edge_detection(to_kernel_edge(edge, config.active_low));
            b.with_event_clock(line::EventClock::Monotonic);
        }
        if let Some(period) = config.debounce {
            b.with_debounce_period(period);
        }
        let req = b
            .request()
            .map_err(|e| busy_consumer(&loc, gpio_error(&loc.chip, &name, e)))?;
        Ok(LinuxInputPin {
            readiness: None,
            req,
            loc,
            name,
            active_low: config.active_low,
            edge: config.edge,
        })
    }

    /// Where the line is.
    pub fn location(&self) -> &LineLocation {
        &self.loc
    }

    /// Changes the request's bias, active-low, edge detection and debounce in place (the
    /// uAPI's line-config ioctl): the line stays requested, so no other consumer can take it
    /// meanwhile, and edge events already queued by the kernel stay queued.
    pub fn reconfigure(&mut self, config: &InputConfig) -> Result<()> {
        let mut cfg = gpiocdev::request::Config::default();
        cfg.with_line(self.loc.offset).as_input();
        if config.active_low {
            cfg.as_active_low();
        } else {
            cfg.as_active_high();
        }
        if let Some(bias) = config.bias {
            cfg.with_bias(to_bias(bias));
        }
        cfg.with_edge_detection(config.edge.map(|e| to_kernel_edge(e, config.active_low)));
        if config.edge.is_some() {
            cfg.with_event_clock(line::EventClock::Monotonic);
        }
        cfg.with_debounce_period(config.debounce.unwrap_or(Duration::ZERO));
        self.req
            .reconfigure(&cfg)
            .map_err(|e| gpio_error(&self.loc.chip, &self.name, e))?;
        self.active_low = config.active_low;
        self.edge = config.edge;
        Ok(())
    }

    /// The physical level.
    pub fn level(&self) -> Result<Level> {
        self.req
            .value(self.loc.offset)
            .map(|v| to_level(v, self.active_low))
            .map_err(|e| gpio_error(&self.loc.chip, &self.name, e))
    }

    /// Take the next queued edge event without waiting (`Ok(None)`: none queued), as
    /// [`crate::sim::SimInputPin::try_event`] does.
    pub fn try_event(&mut self) -> Result<Option<EdgeEvent>> {
        self.read_event(Duration::ZERO)
    }

    /// Wait up to `timeout` for the next edge event, stamped by the kernel
    /// (`CLOCK_MONOTONIC`). `Ok(None)` means the time ran out.
    pub fn read_event(&mut self, timeout: Duration) -> Result<Option<EdgeEvent>> {
        let err = |e| gpio_error(&self.loc.chip, &self.name, e);
        if !self.req.wait_edge_event(timeout).map_err(err)? {
            return Ok(None);
        }
        let ev = self.req.read_edge_event().map_err(err)?;
        Ok(Some(EdgeEvent {
            edge: from_kernel_edge(ev.kind, self.active_low),
            timestamp_ns: ev.timestamp_ns,
            seqno: ev.line_seqno,
        }))
    }
}

impl LinuxInputPin {
    fn line_error(&self, message: impl Into<String>) -> Error {
        Error::Line {
            label: self.name.clone(),
            message: message.into(),
        }
    }

    /// Waits, without blocking a thread, for the next edge event: the request's fd is
    /// registered with tokio's reactor (so this needs a tokio runtime) and read only once
    /// the kernel says an event is queued.
    pub async fn next_event(&mut self) -> Result<EdgeEvent> {
        if self.edge.is_none() {
            return Err(
                self.line_error("waiting for an edge needs the line requested with edge detection")
            );
        }
        loop {
            if let Some(event) = self.try_event()? {
                return Ok(event);
            }
            if self.readiness.is_none() {
                self.readiness = Some(self.register()?);
            }
            let Some(readiness) = &self.readiness else {
                continue;
            };
            let mut ready = readiness
                .readable()
                .await
                .map_err(|e| Error::from_io(&self.loc.chip, e))?;
            ready.clear_ready();
        }
    }

    /// Registers a duplicate of the request's fd with the current tokio runtime's reactor.
    /// tokio 1.54 made every `AsyncFd` constructor `unsafe` (I/O safety), hence the one
    /// `unsafe` block, whose contract an owned duplicate meets by construction.
    #[allow(unsafe_code)]
    fn register(&self) -> Result<tokio::io::unix::AsyncFd<OwnedFd>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(self.line_error("waiting for edges needs a tokio runtime"));
        }
        let fd = self
            .req
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io(&self.loc.chip, e))?;
        // SAFETY: the `AsyncFd` owns `fd` (a duplicate made just above, used for nothing
        // else), so the fd stays open and the same for the whole life of the registration.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| self.line_error(format!("cannot wait for edges: {e}")))
    }

    /// A handle that waits for this line's edge events without holding the pin, so that one
    /// task can sleep until an edge while another reads the pin: see [`LinuxEdgeWatch`].
    /// Needs the line requested with edge detection, and a tokio runtime.
    pub fn edge_watch(&self) -> Result<LinuxEdgeWatch> {
        if self.edge.is_none() {
            return Err(
                self.line_error("waiting for an edge needs the line requested with edge detection")
            );
        }
        Ok(LinuxEdgeWatch {
            readiness: self.register()?,
            label: self.name.clone(),
        })
    }

    /// Drops the edge events queued before now, so an edge wait sees only later ones.
    fn drain_events(&mut self) -> Result<()> {
        while self.try_event()?.is_some() {}
        Ok(())
    }

    /// Whether the request reports `edge`; an error naming the line if not, since waiting
    /// for it would never end.
    fn needs_edge(&self, edge: Edge) -> Result<()> {
        if self.edge.is_some_and(|e| e.matches(edge)) {
            Ok(())
        } else {
            Err(self.line_error(format!(
                "waiting for a {} edge needs the line requested with that edge detection (it has {:?})",
                match edge {
                    Edge::Rising => "rising",
                    Edge::Falling => "falling",
                },
                self.edge
            )))
        }
    }

    async fn wait_level(&mut self, level: Level) -> Result<()> {
        let edge = if level.is_high() {
            Edge::Rising
        } else {
            Edge::Falling
        };
        self.needs_edge(edge)?;
        // Old events first, then the level: an edge after the read stays queued.
        self.drain_events()?;
        if self.level()? == level {
            return Ok(());
        }
        while self.next_event().await?.edge != edge {}
        Ok(())
    }

    async fn wait_edge(&mut self, wanted: EdgeDetection) -> Result<()> {
        match wanted {
            EdgeDetection::Rising => self.needs_edge(Edge::Rising)?,
            EdgeDetection::Falling => self.needs_edge(Edge::Falling)?,
            EdgeDetection::Both => {
                if self.edge.is_none() {
                    return Err(self.line_error(
                        "waiting for an edge needs the line requested with edge detection",
                    ));
                }
            }
        }
        self.drain_events()?;
        while !wanted.matches(self.next_event().await?.edge) {}
        Ok(())
    }
}

mod wait;
pub use wait::LinuxEdgeWatch;

#[cfg(test)]
mod tests;
