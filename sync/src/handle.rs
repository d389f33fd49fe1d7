//! What the session tells the agent ([`SessionEvent`]) and how the agent steers it
//! ([`SyncHandle`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::drain::UnpublishableRow;
use crate::inbound::{Inbound, InboundError};
use crate::outbox::OutboxError;

/// What happened in the session, for the agent to act on and report.
#[derive(Debug)]
pub enum SessionEvent {
    /// Connected to the broker (CONNACK accepted).
    Connected {
        /// Whether the broker still had this node's session (subscriptions, queued commands).
        session_present: bool,
    },
    /// A connection attempt failed.
    ConnectFailed {
        /// What failed, naming the broker.
        error: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// An established connection dropped.
    Disconnected {
        /// Why, naming the broker.
        error: String,
        /// Records sent but not acknowledged, to be sent again.
        resend: usize,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// A deployment or a new command arrived.
    Inbound(Inbound),
    /// An inbound message was refused.
    Rejected(InboundError),
    /// An outbox row could never be published and was deleted.
    Unpublishable(UnpublishableRow),
    /// The broker accepted the subscriptions to `desired` and `cmd/+`: inbound messages flow.
    Subscribed,
    /// The broker refused a subscription (an ACL, most likely).
    SubscribeRefused {
        /// The topic filter.
        filter: String,
    },
    /// Reading or deleting outbox rows failed; retried later.
    Outbox(OutboxError),
}

/// A change of the session's extra subscriptions.
#[derive(Debug)]
pub(crate) enum SubscriptionChange {
    Add(Vec<String>),
    Remove(Vec<String>),
}

/// Controls a running [`SyncSession`]. Dropping every handle stops the session too.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    pub(crate) notify: Arc<Notify>,
    pub(crate) stop: Arc<watch::Sender<bool>>,
    pub(crate) subscriptions: mpsc::UnboundedSender<SubscriptionChange>,
}

impl SyncHandle {
    /// Subscribes (QoS 1) to these topic filters as well as `desired` and `cmd/+`, now and
    /// after every reconnect, until [`SyncHandle::unsubscribe`]. Used for artifact transfers.
    pub fn subscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.subscriptions.send(SubscriptionChange::Add(filters));
        }
    }

    /// Drops filters added by [`SyncHandle::subscribe`].
    pub fn unsubscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.subscriptions.send(SubscriptionChange::Remove(filters));
        }
    }

    /// New rows are in the outbox: read them now rather than at the next poll.
    pub fn outbox_changed(&self) {
        self.notify.notify_one();
    }

    /// Disconnect cleanly and make [`SyncSession::run`] return.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}
