//! Service-wide counters and histograms, rendered in the Prometheus text format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A cumulative Prometheus histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            acc += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Counters kept by the service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Workload requests answered by guests.
    pub requests: AtomicU64,
    /// Workload requests that failed.
    pub request_errors: AtomicU64,
    /// Latency of workload requests (through the request device).
    pub request_latency: Histogram,
    /// Latency of clone calls (whole API call).
    pub clone_latency: Histogram,
    /// Clones created.
    pub clones_created: AtomicU64,
    /// VMs seen failing.
    pub vm_failures: AtomicU64,
    /// API error responses by code.
    pub api_errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// Gauges computed from the registry at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// Parent VMs.
    pub parents: u64,
    /// Clones.
    pub clones: u64,
    /// VMs by state: running, paused, failed, other.
    pub running: u64,
    /// Paused VMs.
    pub paused: u64,
    /// Failed VMs.
    pub failed: u64,
    /// Guest memory reserved by live VMs.
    pub guest_memory: u64,
    /// Page faults served for live VMs.
    pub faults: u64,
    /// Pages installed in live VMs.
    pub pages_fetched: u64,
    /// Host memory owned by live VMs.
    pub footprint: u64,
    /// Open file descriptors of the service.
    pub open_files: u64,
    /// Its soft RLIMIT_NOFILE.
    pub open_files_limit: u64,
    /// The pool of pre-created VM shells (all zero without a pool).
    pub pool: kscope_vmm::pool::PoolStats,
}

impl Metrics {
    /// Count an API error response.
    pub fn api_error(&self, code: &'static str) {
        *self
            .api_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    /// Render every metric.
    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut o, "kscope_vms", "Parent VMs.", g.parents);
        gauge(&mut o, "kscope_clones", "Clone VMs.", g.clones);
        let _ = writeln!(
            o,
            "# HELP kscope_vms_by_state VMs (parents and clones) by state.\n# TYPE kscope_vms_by_state gauge\nkscope_vms_by_state{{state=\"running\"}} {}\nkscope_vms_by_state{{state=\"paused\"}} {}\nkscope_vms_by_state{{state=\"failed\"}} {}",
            g.running, g.paused, g.failed
        );
        gauge(
            &mut o,
            "kscope_guest_memory_bytes",
            "Guest RAM reserved by live VMs.",
            g.guest_memory,
        );
        gauge(
            &mut o,
            "kscope_footprint_bytes",
            "Host memory owned by live VMs (private pages).",
            g.footprint,
        );
        gauge(
            &mut o,
            "kscope_open_files",
            "Open file descriptors of the service.",
            g.open_files,
        );
        gauge(
            &mut o,
            "kscope_open_files_limit",
            "Soft open-file limit of the service (raised to the hard limit at start).",
            g.open_files_limit,
        );
        gauge(
            &mut o,
            "kscope_pool_capacity",
            "Most pre-created VM shells kept for lazy clones (--pool).",
            g.pool.capacity as u64,
        );
        gauge(
            &mut o,
            "kscope_pool_ready",
            "Pre-created VM shells ready now.",
            g.pool.ready as u64,
        );
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut o,
            "kscope_pool_hits_total",
            "Lazy clones made from a pre-created VM shell.",
            g.pool.hits,
        );
        counter(
            &mut o,
            "kscope_pool_misses_total",
            "Lazy clones that found no ready shell and made their own (the slower path).",
            g.pool.misses,
        );
        counter(
            &mut o,
            "kscope_pool_shell_failures_total",
            "Shells the pool failed to make (see the log; it retries).",
            g.pool.failed,
        );
        counter(
            &mut o,
            "kscope_faults_total",
            "Page faults served, over every VM the service ran (deleted ones included).",
            g.faults,
        );
        counter(
            &mut o,
            "kscope_pages_fetched_total",
            "Pages installed in lazily served VMs, over every VM the service ran.",
            g.pages_fetched,
        );
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut o,
            "kscope_requests_total",
            "Workload requests answered.",
            ld(&self.requests),
        );
        counter(
            &mut o,
            "kscope_request_errors_total",
            "Workload requests that failed.",
            ld(&self.request_errors),
        );
        counter(
            &mut o,
            "kscope_clones_created_total",
            "Clones created.",
            ld(&self.clones_created),
        );
        counter(
            &mut o,
            "kscope_vm_failures_total",
            "VMs that failed.",
            ld(&self.vm_failures),
        );
        self.request_latency.render(
            &mut o,
            "kscope_request_latency_seconds",
            "Latency of workload requests through the request device.",
        );
        self.clone_latency.render(
            &mut o,
            "kscope_clone_latency_seconds",
            "Latency of clone API calls.",
        );
        let _ = writeln!(
            o,
            "# HELP kscope_api_errors_total API error responses by code.\n# TYPE kscope_api_errors_total counter"
        );
        for (code, n) in self
            .api_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(o, "kscope_api_errors_total{{code=\"{code}\"}} {n}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.0001\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.005\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"5\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }
}
