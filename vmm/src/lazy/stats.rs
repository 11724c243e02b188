//! Per-clone statistics of lazy memory serving (lock-free counters, serializable snapshot).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Sub-buckets per power of two (relative error of a percentile <= 1/16).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const LINEAR: u64 = 2 * SUB;
const BUCKETS: usize = (LINEAR + (64 - (SUB_BITS as u64 + 1)) * SUB) as usize;

/// A log-linear histogram of durations in nanoseconds (HDR-style: 8 sub-buckets per power of
/// two), updated with relaxed atomics.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - u64::from(v.leading_zeros()); // >= SUB_BITS + 1
    let sub = (v >> (exp - u64::from(SUB_BITS))) & (SUB - 1);
    (LINEAR + (exp - u64::from(SUB_BITS) - 1) * SUB + sub) as usize
}

/// (lower bound, width) of a bucket.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR {
        return (i, 1);
    }
    let exp = (i - LINEAR) / SUB + u64::from(SUB_BITS) + 1;
    let sub = (i - LINEAR) % SUB;
    let width = 1u64 << (exp - u64::from(SUB_BITS));
    ((SUB + sub) * width, width)
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(ns, Ordering::Relaxed);
        self.max.fetch_max(ns, Ordering::Relaxed);
    }

    /// Number of recorded durations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of recorded durations (ns).
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// Largest recorded duration (ns).
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// The `q`-quantile (0..=1) in ns, as the middle of its bucket (0 if empty).
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = bucket_range(i);
                return (lo + w / 2).min(self.max());
            }
        }
        self.max()
    }
}

/// Live counters of one clone, updated by its handler and fetcher threads.
#[derive(Debug, Default)]
pub struct CloneStats {
    /// Fault events served (each blocked a vCPU or a VMM thread).
    pub faults: AtomicU64,
    /// Faulting pages installed with data from the source.
    pub fault_pages: AtomicU64,
    /// Pages installed from a fault's prefetch list.
    pub prefetched: AtomicU64,
    /// Pages installed before resume.
    pub before_resume: AtomicU64,
    /// Pages installed by the background fetcher.
    pub background: AtomicU64,
    /// Pages installed as zero pages (any path).
    pub zero_filled: AtomicU64,
    /// Bytes copied into the destination by `UFFDIO_COPY`.
    pub bytes_copied: AtomicU64,
    /// Installs that found the page already present (a race with another installer).
    pub already_present: AtomicU64,
    /// Source read errors (the page was served as zeros).
    pub source_errors: AtomicU64,
    /// Install ioctls that failed.
    pub install_errors: AtomicU64,
    /// Pages discarded by `MADV_DONTNEED`/`MADV_REMOVE` (served as zeros afterwards).
    pub removed: AtomicU64,
    /// Service time of faults, from reading the event to waking the faulter.
    pub fault_latency: LatencyHistogram,
}

impl CloneStats {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A point-in-time copy of a clone's statistics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// Prefetch policy name.
    pub policy: String,
    /// Fault events served.
    pub faults: u64,
    /// Faulting pages installed with data.
    pub fault_pages: u64,
    /// Pages installed from prefetch lists.
    pub prefetched: u64,
    /// Pages installed before resume.
    pub before_resume: u64,
    /// Pages installed by the background fetcher.
    pub background: u64,
    /// Pages installed as zero pages.
    pub zero_filled: u64,
    /// Bytes copied by `UFFDIO_COPY`.
    pub bytes_copied: u64,
    /// Installs that found the page already present.
    pub already_present: u64,
    /// Source read errors.
    pub source_errors: u64,
    /// Failed install ioctls.
    pub install_errors: u64,
    /// Pages discarded by the guest/VMM.
    pub removed: u64,
    /// Faults whose service completed (latency samples; trails `faults` by at most the
    /// fault being served).
    pub fault_latency_samples: u64,
    /// Total time faults spent being served (ns).
    pub fault_ns_total: u64,
    /// Mean fault service time (ns).
    pub fault_ns_mean: u64,
    /// Median fault service time (ns).
    pub fault_ns_p50: u64,
    /// 90th percentile (ns).
    pub fault_ns_p90: u64,
    /// 99th percentile (ns).
    pub fault_ns_p99: u64,
    /// Maximum (ns).
    pub fault_ns_max: u64,
    /// Distinct pages that faulted (the touched set).
    pub touched_pages: u64,
    /// Pages present in the destination.
    pub present_pages: u64,
    /// Host bytes allocated to the destination.
    pub resident_bytes: u64,
}

impl CloneStats {
    /// Snapshot of the counters (the caller fills the set sizes, policy and footprint).
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let h = &self.fault_latency;
        StatsSnapshot {
            faults: l(&self.faults),
            fault_pages: l(&self.fault_pages),
            prefetched: l(&self.prefetched),
            before_resume: l(&self.before_resume),
            background: l(&self.background),
            zero_filled: l(&self.zero_filled),
            bytes_copied: l(&self.bytes_copied),
            already_present: l(&self.already_present),
            source_errors: l(&self.source_errors),
            install_errors: l(&self.install_errors),
            removed: l(&self.removed),
            fault_latency_samples: h.count(),
            fault_ns_total: h.sum(),
            fault_ns_mean: h.sum().checked_div(h.count()).unwrap_or(0),
            fault_ns_p50: h.quantile(0.5),
            fault_ns_p90: h.quantile(0.9),
            fault_ns_p99: h.quantile(0.99),
            fault_ns_max: h.max(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_with_small_relative_error() {
        for v in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1000,
            18_000,
            26_000,
            1 << 40,
            u64::MAX / 2,
        ] {
            let (lo, w) = bucket_range(bucket_of(v));
            assert!(
                lo <= v && v < lo.saturating_add(w),
                "{v} not in [{lo}, +{w})"
            );
            assert!(w == 1 || (w as f64) / (lo as f64) <= 0.125 + 1e-9);
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_follow_the_data() {
        let h = LatencyHistogram::default();
        for i in 1..=1000u64 {
            h.record(i * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "p50 {p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "p99 {p99}");
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.count(), 1000);
    }
}
