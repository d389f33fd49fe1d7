//! Waiting on a line without blocking a thread: [`LinuxEdgeWatch`] (the request's fd in
//! tokio's reactor) and embedded-hal's `Wait` and `InputPin` on [`LinuxInputPin`].

use std::os::fd::OwnedFd;

use embedded_hal::digital::{ErrorType, InputPin};
use embedded_hal_async::digital::Wait;

use super::LinuxInputPin;
use crate::{EdgeDetection, Error, Level, Result};

/// Waits for edge events the kernel queued on a line request, apart from the pin that reads
/// them ([`LinuxInputPin::try_event`]): a duplicate of the request's fd in tokio's reactor,
/// readable when an event is queued. It keeps the request open: drop it with the pin.
#[derive(Debug)]
pub struct LinuxEdgeWatch {
    pub(super) readiness: tokio::io::unix::AsyncFd<OwnedFd>,
    pub(super) label: String,
}

impl LinuxEdgeWatch {
    /// Waits, without blocking a thread, until the kernel says an edge event is queued (the
    /// caller then takes every queued event). Fails when the request is closed under it (the
    /// chip went away), so a watcher does not spin on a hung-up fd.
    pub async fn queued(&mut self) -> Result<()> {
        let mut ready = self.readiness.readable().await.map_err(|e| Error::Line {
            label: self.label.clone(),
            message: format!("cannot wait for edges: {e}"),
        })?;
        let readiness = ready.ready();
        if readiness.is_read_closed() || readiness.is_error() {
            return Err(Error::Line {
                label: self.label.clone(),
                message: "the line request was closed (the chip went away)".into(),
            });
        }
        ready.clear_ready();
        Ok(())
    }
}

/// embedded-hal-async's `Wait`, on the line request's edge events: the kernel queues them
/// (debounced, when asked), tokio's reactor says when one is there, no thread blocks. The
/// line must have been requested with edge detection for the edges waited on; edge waits
/// count only edges after the call.
impl Wait for LinuxInputPin {
    async fn wait_for_high(&mut self) -> Result<()> {
        self.wait_level(Level::High).await
    }

    async fn wait_for_low(&mut self) -> Result<()> {
        self.wait_level(Level::Low).await
    }

    async fn wait_for_rising_edge(&mut self) -> Result<()> {
        self.wait_edge(EdgeDetection::Rising).await
    }

    async fn wait_for_falling_edge(&mut self) -> Result<()> {
        self.wait_edge(EdgeDetection::Falling).await
    }

    async fn wait_for_any_edge(&mut self) -> Result<()> {
        self.wait_edge(EdgeDetection::Both).await
    }
}

impl ErrorType for LinuxInputPin {
    type Error = Error;
}

impl InputPin for LinuxInputPin {
    fn is_high(&mut self) -> Result<bool> {
        Ok(self.level()?.is_high())
    }

    fn is_low(&mut self) -> Result<bool> {
        Ok(!self.level()?.is_high())
    }
}
