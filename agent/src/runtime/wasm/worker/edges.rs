//! Feeding `gpio-edge` triggers: a watcher per input takes the edges the line queued and queues
//! the wanted ones as events for the worker.

use std::sync::Arc;

use lichen_host_apis::LogLevel;
use tokio::sync::mpsc;

use super::{Delivery, EventRequest, Queued};

/// Feeds one `gpio-edge` trigger: takes the edges queued on the input and queues the wanted
/// ones as events, then sleeps until the line has more.
pub(super) struct EdgeWatcher {
    /// The instance's grants (weak: the watcher must not keep the pins open).
    pub(super) devices: std::sync::Weak<lichen_host_apis::DeviceGrants>,
    /// Where edge events go (weak: the queue closes with the workload's handle).
    pub(super) queue: mpsc::WeakSender<Queued>,
    pub(super) input: String,
    pub(super) wanted: lichen_devices::EdgeDetection,
    pub(super) logs: Arc<crate::logs::LogHub>,
    pub(super) name: Arc<str>,
}

impl EdgeWatcher {
    /// The input pin, while the instance holds it.
    fn pin(&self) -> Option<Arc<lichen_host_apis::GrantedInput>> {
        let grants = self.devices.upgrade()?;
        match grants.gpio(&self.input) {
            Some(lichen_host_apis::GpioGrant::Input(pin)) => Some(pin.clone()),
            _ => None,
        }
    }

    fn stopped(&self, error: &lichen_devices::Error) {
        self.logs.agent_line(
            &self.name,
            LogLevel::Error,
            &format!("gpio-edge trigger on \"{}\" stopped: {error}", self.input),
        );
    }

    pub(super) async fn run(self) {
        let Some(pin) = self.pin() else { return };
        let watch = pin.edge_watch();
        drop(pin);
        let mut watch = match watch {
            Ok(watch) => watch,
            Err(error) => return self.stopped(&error),
        };
        loop {
            // Everything queued so far; then sleep until the line has more.
            loop {
                let Some(pin) = self.pin() else { return };
                let event = match pin.try_edge() {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(error) => return self.stopped(&error),
                };
                drop(pin);
                if !self.wanted.matches(event.edge) {
                    continue;
                }
                let Some(queue) = self.queue.upgrade() else {
                    return;
                };
                let request = Box::new(EventRequest {
                    delivery: Delivery::GpioEdge {
                        input: self.input.clone(),
                        event,
                    },
                    reply: None,
                });
                if queue.send(request).await.is_err() {
                    return;
                }
            }
            if let Err(error) = watch.queued().await {
                // A line released with its instance ends the watcher quietly.
                if self.pin().is_some() {
                    self.stopped(&error);
                }
                return;
            }
        }
    }
}
