//! Agent metrics in the Prometheus text format: counters and latency histograms updated by
//! the workers, gauges read when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(crate::util::nanos(value), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Counters and histograms shared by every worker.
#[derive(Default)]
pub struct Metrics {
    /// Events handled successfully.
    pub events_handled: AtomicU64,
    /// Traps (including preemptions).
    pub traps: AtomicU64,
    /// Restarts after traps.
    pub restarts: AtomicU64,
    /// Hot reloads that switched to the new version.
    pub reloads: AtomicU64,
    /// Hot reloads that kept the old version.
    pub reload_failures: AtomicU64,
    /// Time to instantiate a component and run its `init`.
    pub instantiate: Histogram,
    /// Time to handle one event, commit included.
    pub handle: Histogram,
}

/// Gauges read at scrape time.
pub struct Gauges {
    /// Live instances.
    pub instances: u64,
    /// Events queued across workloads.
    pub queue_depth: u64,
    /// Resident set size of the agent, in bytes.
    pub rss_bytes: u64,
    /// Rows waiting in the outbox.
    pub outbox_rows: u64,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let counters = [
            (
                "lichen_events_handled_total",
                "Events handled successfully.",
                &self.events_handled,
            ),
            (
                "lichen_traps_total",
                "Guest traps, preemptions included.",
                &self.traps,
            ),
            (
                "lichen_restarts_total",
                "Restarts after traps.",
                &self.restarts,
            ),
            (
                "lichen_reloads_total",
                "Hot reloads that switched to a new version.",
                &self.reloads,
            ),
            (
                "lichen_reload_failures_total",
                "Hot reloads that kept the previous version.",
                &self.reload_failures,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let gauge_rows = [
            ("lichen_instances", "Live Wasm instances.", gauges.instances),
            (
                "lichen_queue_depth",
                "Events waiting in workload queues.",
                gauges.queue_depth,
            ),
            (
                "lichen_process_resident_memory_bytes",
                "Resident set size of the agent.",
                gauges.rss_bytes,
            ),
            (
                "lichen_outbox_rows",
                "Records waiting in the outbox.",
                gauges.outbox_rows,
            ),
        ];
        for (name, help, value) in gauge_rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        self.instantiate.render(
            &mut out,
            "lichen_instantiate_seconds",
            "Time to instantiate a component and run its init.",
        );
        self.handle.render(
            &mut out,
            "lichen_handle_seconds",
            "Time to handle one event, commit included.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.handle.observe(Duration::from_micros(20));
        m.handle.observe(Duration::from_millis(2));
        let text = m.render(&Gauges {
            instances: 3,
            queue_depth: 0,
            rss_bytes: 1,
            outbox_rows: 0,
        });
        assert!(
            text.contains("lichen_handle_seconds_bucket{le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lichen_handle_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(text.contains("lichen_handle_seconds_count 2"));
        assert!(text.contains("lichen_instances 3"));
    }
}
