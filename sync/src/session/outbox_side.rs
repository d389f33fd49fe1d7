//! The session's outbox side: what the drain allows is handed to the MQTT client, rows are
//! read from the outbox as the drain asks, and acknowledged rows are deleted in batches, each
//! on Tokio's blocking pool.

use rumqttc::{AsyncClient, QoS};
use tracing::warn;

use super::SyncSession;
use crate::handle::SessionEvent;
use crate::outbox::OutboxError;

impl SyncSession {
    /// Hands the client every publish the drain allows now, while its channel has room.
    pub(super) async fn publish_ready(&mut self, client: &AsyncClient) {
        while let Some(next) = self.drain.next_publish() {
            match next {
                Ok(p) => {
                    if client
                        .try_publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload)
                        .is_err()
                    {
                        // Full: this row goes first when there is room.
                        self.drain.unsubmit();
                        return;
                    }
                }
                Err(bad) => {
                    warn!(error = %bad, "outbox row dropped");
                    self.acked.push(bad.row);
                    self.emit(SessionEvent::Unpublishable(bad)).await;
                }
            }
        }
    }

    /// Reads what the drain wants from the outbox; returns whether more may be there.
    pub(super) async fn read_outbox(&mut self) -> bool {
        let limit = self.drain.wanted();
        let after = self.drain.cursor();
        let outbox = self.outbox.clone();
        let read = tokio::task::spawn_blocking(move || outbox.next_rows(after, limit))
            .await
            .unwrap_or_else(|e| {
                Err(OutboxError {
                    op: "read",
                    reason: e.to_string(),
                })
            });
        match read {
            Ok(rows) => {
                let full = rows.len() >= limit;
                self.drain.add_rows(rows);
                full
            }
            Err(e) => {
                warn!(error = %e, "outbox read failed");
                self.emit(SessionEvent::Outbox(e)).await;
                false
            }
        }
    }

    /// Deletes the acknowledged rows; on failure they are kept and tried again.
    pub(super) async fn flush_acked(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acked);
        let outbox = self.outbox.clone();
        let (ids, result) = tokio::task::spawn_blocking(move || {
            let r = outbox.delete(&ids);
            (ids, r)
        })
        .await
        .expect("outbox delete task does not panic: Outbox::delete returns its errors");
        if let Err(e) = result {
            warn!(error = %e, rows = ids.len(), "outbox delete failed");
            self.acked.extend(ids);
            self.emit(SessionEvent::Outbox(e)).await;
        }
    }
}
