//! The experiment's metrics, computed the same way from a real replay ([`crate::lb::LbReport`])
//! and from the simulation: overloads, server usage, datacenter size and QoS.

use serde::{Deserialize, Serialize};

use super::Strategy;
use crate::lb::LbReport;

/// What counts as an overload: a window in which the service misses its SLO.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// The window's p90 latency above this (ms) is an overload.
    pub p90_ms: f64,
    /// A window with at least one failed (dropped) request is an overload.
    pub drops: bool,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            p90_ms: 100.0,
            drops: true,
        }
    }
}

/// One service's metrics under one strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceMetrics {
    /// Service.
    pub service: String,
    /// Strategy.
    pub strategy: String,
    /// Windows with traffic.
    pub windows: usize,
    /// Windows that missed the SLO.
    pub overloads: usize,
    /// Requests (answered + failed).
    pub requests: usize,
    /// Requests failed.
    pub failed: usize,
    /// Worker memory-seconds from real footprints (GiB s).
    pub mem_gib_s: f64,
    /// Worker vCPU-seconds (from the scale-out decision to removal).
    pub vcpu_s: f64,
    /// Most workers at once.
    pub peak_workers: usize,
    /// Most worker memory at once (bytes).
    pub peak_mem_bytes: u64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Scale-outs (workers added).
    pub scale_outs: usize,
    /// Median time from the scale-out decision to the new worker's first answer (ms).
    pub first_answer_p50_ms: f64,
    /// Its 90th percentile (ms).
    pub first_answer_p90_ms: f64,
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Metrics of one balancer run (`window_s`: its window length).
pub fn service_metrics(
    name: &str,
    r: &LbReport,
    slo: &Slo,
    window_s: f64,
    strategy: Strategy,
) -> ServiceMetrics {
    let active: Vec<_> = r
        .timeline
        .iter()
        .filter(|i| i.arrived + i.completed + i.failed > 0)
        .collect();
    let overloads = active
        .iter()
        .filter(|i| i.latency.p90_us / 1e3 > slo.p90_ms || (slo.drops && i.failed > 0))
        .count();
    let mem_gib_s = r
        .timeline
        .iter()
        .map(|i| i.memory_bytes as f64 / (1u64 << 30) as f64 * window_s)
        .sum();
    let vcpu_s = r
        .workers
        .iter()
        .map(|w| (w.removed_s - if w.initial { w.ready_s } else { w.decided_s }).max(0.0))
        .sum();
    let mut fa: Vec<f64> = r
        .workers
        .iter()
        .filter(|w| !w.initial)
        .filter_map(|w| w.first_answer_s.map(|f| (f - w.decided_s) * 1e3))
        .collect();
    ServiceMetrics {
        service: name.to_string(),
        strategy: strategy.name().to_string(),
        windows: active.len(),
        overloads,
        requests: r.requests,
        failed: r.failed + r.guest_errors,
        mem_gib_s,
        vcpu_s,
        peak_workers: r.max_workers,
        peak_mem_bytes: r.timeline.iter().map(|i| i.memory_bytes).max().unwrap_or(0),
        p50_ms: r.latency.p50_us / 1e3,
        p99_ms: r.latency.p99_us / 1e3,
        scale_outs: r.workers.iter().filter(|w| !w.initial).count(),
        first_answer_p50_ms: pct(&mut fa, 0.5),
        first_answer_p90_ms: pct(&mut fa, 0.9),
    }
}

/// The sum (or max, or pooled median) of per-service metrics: one row per strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Strategy.
    pub strategy: String,
    /// Windows with traffic (all services).
    pub windows: usize,
    /// Overload windows (all services).
    pub overloads: usize,
    /// Failed requests.
    pub failed: usize,
    /// Worker memory (GiB s).
    pub mem_gib_s: f64,
    /// Worker vCPU s.
    pub vcpu_s: f64,
    /// Sum over services of their peak workers.
    pub peak_workers: usize,
    /// Sum over services of their peak memory (bytes).
    pub peak_mem_bytes: u64,
    /// Worst service p99 (ms).
    pub worst_p99_ms: f64,
    /// Median over services of their p50 (ms).
    pub p50_ms: f64,
    /// Median over services of the scale-out to first answer medians (ms).
    pub first_answer_ms: f64,
}

/// Totals of one strategy's per-service metrics.
pub fn totals(strategy: &str, ms: &[ServiceMetrics]) -> Totals {
    let mut p50: Vec<f64> = ms.iter().map(|m| m.p50_ms).collect();
    let mut fa: Vec<f64> = ms
        .iter()
        .filter(|m| m.scale_outs > 0)
        .map(|m| m.first_answer_p50_ms)
        .collect();
    Totals {
        strategy: strategy.to_string(),
        windows: ms.iter().map(|m| m.windows).sum(),
        overloads: ms.iter().map(|m| m.overloads).sum(),
        failed: ms.iter().map(|m| m.failed).sum(),
        mem_gib_s: ms.iter().map(|m| m.mem_gib_s).sum(),
        vcpu_s: ms.iter().map(|m| m.vcpu_s).sum(),
        peak_workers: ms.iter().map(|m| m.peak_workers).sum(),
        peak_mem_bytes: ms.iter().map(|m| m.peak_mem_bytes).sum(),
        worst_p99_ms: ms.iter().map(|m| m.p99_ms).fold(0.0, f64::max),
        p50_ms: pct(&mut p50, 0.5),
        first_answer_ms: pct(&mut fa, 0.5),
    }
}

/// How `best` compares with `base`: (fewer overloads %, less memory usage %, less vCPU %).
pub fn savings(base: &Totals, best: &Totals) -> (f64, f64, f64) {
    let less = |a: f64, b: f64| if a > 0.0 { (1.0 - b / a) * 100.0 } else { 0.0 };
    (
        less(base.overloads as f64, best.overloads as f64),
        less(base.mem_gib_s, best.mem_gib_s),
        less(base.vcpu_s, best.vcpu_s),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_savings() {
        let m = |o, mem| ServiceMetrics {
            overloads: o,
            mem_gib_s: mem,
            vcpu_s: mem,
            windows: 10,
            ..Default::default()
        };
        let cold = totals("cold", &[m(40, 10.0), m(10, 10.0)]);
        let ks = totals("kaleidoscope", &[m(1, 7.0), m(0, 8.0)]);
        assert_eq!(cold.overloads, 50);
        let (o, mem, _) = savings(&cold, &ks);
        assert!((o - 98.0).abs() < 1e-9);
        assert!((mem - 25.0).abs() < 1e-9);
    }
}
