//! What to drop when the outbox outgrows its disk quota.
//!
//! Only telemetry is ever dropped, oldest first; reported state, command results and events are
//! kept even past the quota (they are small and losing them would lie to the hub). Drops are
//! counted per workload so the agent can put the counts in reported state.

use std::collections::BTreeMap;

use crate::outbox::{RowId, RowKind};

/// What [`Quota::plan`] needs to know of one outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSize {
    /// The row.
    pub id: RowId,
    /// Its workload.
    pub workload: String,
    /// Its kind.
    pub kind: RowKind,
    /// Bytes it takes in the outbox.
    pub bytes: u64,
}

/// The rows to drop to get back under the quota.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropPlan {
    /// Rows to delete, oldest first.
    pub ids: Vec<RowId>,
    /// Bytes they free.
    pub bytes: u64,
    /// Rows dropped per workload in this plan.
    pub per_workload: BTreeMap<String, u64>,
    /// Bytes still over the quota after the drops (only rows that are never dropped left).
    pub still_over: u64,
}

/// The outbox disk quota and the running count of dropped telemetry per workload.
#[derive(Debug, Clone)]
pub struct Quota {
    limit_bytes: u64,
    dropped: BTreeMap<String, u64>,
}

impl Quota {
    /// A quota of `limit_bytes` for the whole outbox.
    pub fn new(limit_bytes: u64) -> Self {
        Quota {
            limit_bytes,
            dropped: BTreeMap::new(),
        }
    }

    /// The limit in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Given the outbox size now and its rows (any order), the rows to drop: the oldest telemetry
    /// until the size fits. The drops are added to [`Quota::dropped`]; the caller deletes them.
    pub fn plan(&mut self, outbox_bytes: u64, rows: impl IntoIterator<Item = RowSize>) -> DropPlan {
        let mut plan = DropPlan::default();
        let mut over = outbox_bytes.saturating_sub(self.limit_bytes);
        if over == 0 {
            return plan;
        }
        let mut telemetry: Vec<RowSize> = rows
            .into_iter()
            .filter(|r| r.kind == RowKind::Telemetry)
            .collect();
        telemetry.sort_unstable_by_key(|r| r.id);
        for row in telemetry {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(row.bytes);
            plan.bytes += row.bytes;
            plan.ids.push(row.id);
            *plan.per_workload.entry(row.workload).or_default() += 1;
        }
        plan.still_over = over;
        for (workload, n) in &plan.per_workload {
            *self.dropped.entry(workload.clone()).or_default() += n;
        }
        plan
    }

    /// Telemetry rows dropped so far, per workload.
    pub fn dropped(&self) -> &BTreeMap<String, u64> {
        &self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: u64, workload: &str, kind: RowKind, bytes: u64) -> RowSize {
        RowSize {
            id: RowId(id),
            workload: workload.into(),
            kind,
            bytes,
        }
    }

    #[test]
    fn under_the_quota_nothing_is_dropped() {
        let mut q = Quota::new(1000);
        let plan = q.plan(1000, [r(1, "a", RowKind::Telemetry, 1000)]);
        assert_eq!(plan, DropPlan::default());
        assert!(q.dropped().is_empty());
    }

    #[test]
    fn oldest_telemetry_goes_first_and_state_never() {
        let mut q = Quota::new(300);
        let rows = [
            r(5, "b", RowKind::Telemetry, 100),
            r(1, "a", RowKind::State, 100),
            r(2, "a", RowKind::Telemetry, 100),
            r(3, "a", RowKind::CmdResult, 100),
            r(4, "b", RowKind::Telemetry, 100),
            r(6, "a", RowKind::Event, 100),
        ];
        let plan = q.plan(600, rows);
        assert_eq!(plan.ids, [RowId(2), RowId(4), RowId(5)]);
        assert_eq!(plan.bytes, 300);
        assert_eq!(plan.still_over, 0);
        assert_eq!(
            plan.per_workload,
            BTreeMap::from([("a".into(), 1), ("b".into(), 2)])
        );
    }

    #[test]
    fn counts_accumulate_and_state_alone_stays_over() {
        let mut q = Quota::new(100);
        q.plan(200, [r(1, "a", RowKind::Telemetry, 100)]);
        let plan = q.plan(
            400,
            [
                r(2, "a", RowKind::Telemetry, 100),
                r(3, "a", RowKind::State, 200),
            ],
        );
        assert_eq!(plan.ids, [RowId(2)]);
        assert_eq!(plan.still_over, 200);
        assert_eq!(q.dropped(), &BTreeMap::from([("a".into(), 2)]));
    }
}
