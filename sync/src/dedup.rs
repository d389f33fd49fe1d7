//! Remembering recent inbound command ids, so a command delivered twice (QoS 1) runs once.
//!
//! Bounded: the oldest id is forgotten when a new one would exceed the capacity. The hub resends
//! only recent messages, so a window of a few thousand ids is plenty. This memory lasts as long as
//! the process; across restarts the agent keeps ids in its inbox table.

use std::collections::{HashSet, VecDeque};

use crate::message::MessageId;

/// The last `capacity` inbound command ids.
#[derive(Debug, Clone)]
pub struct InboundDedup {
    capacity: usize,
    order: VecDeque<MessageId>,
    seen: HashSet<MessageId>,
}

impl InboundDedup {
    /// Remembers up to `capacity` (at least 1) ids.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        InboundDedup {
            capacity,
            order: VecDeque::with_capacity(capacity),
            seen: HashSet::with_capacity(capacity),
        }
    }

    /// Whether `id` is new; it is remembered from now on.
    pub fn is_new(&mut self, id: &MessageId) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id.clone());
        self.seen.insert(id.clone());
        true
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_is_not_new() {
        let mut d = InboundDedup::new(10);
        let id = MessageId::new("hub", 1);
        assert!(d.is_new(&id));
        assert!(!d.is_new(&id));
        assert!(d.is_new(&MessageId::new("hub", 2)));
        assert!(d.is_new(&MessageId::new("other-hub", 1)));
    }

    #[test]
    fn memory_is_bounded_and_forgets_the_oldest() {
        let mut d = InboundDedup::new(3);
        for seq in 1..=4 {
            assert!(d.is_new(&MessageId::new("hub", seq)));
        }
        assert_eq!(d.len(), 3);
        assert!(!d.is_new(&MessageId::new("hub", 4)));
        assert!(d.is_new(&MessageId::new("hub", 1)), "oldest was forgotten");
    }
}
