//! `kscope experiment simulate`: a datacenter-scale simulation of the elastic cloud, driven by
//! measured cost models ([`super::model`]).
//!
//! Time advances in controller windows (the load balancer's period). Within a window each
//! service is a multi-server queue: its ready workers serve at the warm capacity times the
//! measured warm-up fraction of their age; arrivals follow the trace (scaled and compressed
//! exactly as in the replay); work that does not fit is queued (a fluid backlog). The window's
//! p90 latency is the measured service p90 plus the M/M/c (Erlang C) waiting-time p90 plus the
//! time to drain the backlog. The controller mirrors `kscope lb`: it adds `ceil(n / 2)` workers
//! when the p90 is above its trigger or the queue per worker above its limit (one scale-out at
//! a time, ready after a delay drawn from the measured distribution), and removes a worker
//! once one has been idle for the cool-down (with join-the-shortest-queue, the last worker only
//! sees the overflow of the others: `lambda * ErlangB(n - 1, a)`). Scale-outs are events in a
//! binary-heap queue. With a host count, workers need host memory (their measured footprint)
//! and the hosts' cores are shared: a scale-out that does not fit fails, and busy workers
//! beyond the cores slow down.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::metrics::{ServiceMetrics, Slo, Totals};
use super::model::{CostModel, ModelError, StrategyModel, WorkloadModel};
use super::trace::Trace;
use super::Strategy;

/// Simulation parameters (the replay's balancer settings, plus hosts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Trace seconds per simulated second.
    pub compress: f64,
    /// Simulate at most this long (s).
    pub max_s: f64,
    /// A service's peak rate needs this many warm workers.
    pub peak_workers: f64,
    /// Overload definition.
    pub slo: Slo,
    /// Scale out above this p90 (ms).
    pub scale_p90_ms: f64,
    /// Scale out above this many requests in flight per worker.
    pub max_queue: f64,
    /// Controller window (s).
    pub window_s: f64,
    /// Idle cool-down (s).
    pub cooldown_s: f64,
    /// Most workers per service.
    pub max_workers: usize,
    /// Hosts (None: unlimited).
    pub hosts: Option<usize>,
    /// Memory per host (bytes).
    pub host_mem_bytes: u64,
    /// Cores per host.
    pub host_cores: usize,
    /// Seed of the delay draws.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            compress: 60.0,
            max_s: 60.0,
            peak_workers: 1.5,
            slo: Slo::default(),
            scale_p90_ms: 50.0,
            max_queue: 2.0,
            window_s: 0.5,
            cooldown_s: 2.0,
            max_workers: 8,
            hosts: None,
            host_mem_bytes: 24 << 30,
            host_cores: 2,
            seed: 1,
        }
    }
}

/// One strategy's simulated results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimRun {
    /// Strategy.
    pub strategy: Strategy,
    /// Totals over services.
    pub totals: Totals,
    /// Peak over time of the summed worker memory (bytes).
    pub dc_peak_mem_bytes: u64,
    /// Peak over time of the summed workers.
    pub dc_peak_workers: usize,
    /// Hosts needed for the peak memory.
    pub hosts_for_peak: usize,
    /// Scale-outs refused because the hosts were full.
    pub refused: usize,
    /// Per service (only for small runs; empty above 64 services).
    pub services: Vec<ServiceMetrics>,
    /// Timeline of service 0: (t_s, rate, workers, p90_ms).
    pub timeline0: Vec<(f64, f64, usize, f64)>,
}

#[derive(Clone)]
struct Worker {
    ready_at: f64,
    initial: bool,
}

struct Svc {
    wl: WorkloadModel,
    scale: f64,
    workers: Vec<Worker>,
    pending: usize,
    scaling: bool,
    backlog: f64,
    idle_for: f64,
    m: ServiceMetrics,
    hist: Histogram<u64>,
    fa: Vec<f64>,
    busy: f64,
}

/// Erlang B blocking probability with `c` servers and offered load `a`.
fn erlang_b(c: usize, a: f64) -> f64 {
    let mut b = 1.0;
    for k in 1..=c {
        b = a * b / (k as f64 + a * b);
    }
    b
}

/// Erlang C waiting probability (c servers, load a < c).
fn erlang_c(c: usize, a: f64) -> f64 {
    let b = erlang_b(c, a);
    let rho = a / c as f64;
    if rho >= 1.0 {
        return 1.0;
    }
    b / (1.0 - rho + rho * b)
}

fn draw(rng: &mut StdRng, v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v[rng.random_range(0..v.len())]
    }
}

/// Simulate one strategy.
pub fn simulate(
    trace: &Trace,
    model: &CostModel,
    strategy: Strategy,
    cfg: &SimConfig,
    mut tick: impl FnMut(f64),
) -> Result<SimRun, ModelError> {
    let sm: &StrategyModel = model.strategy(strategy)?;
    let bucket = model.bucket_s;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let end = (trace.duration_s() / cfg.compress).min(cfg.max_s);
    let dt = cfg.window_s;
    let mut svcs = Vec::with_capacity(trace.services.len());
    for (i, sv) in trace.services.iter().enumerate() {
        let wl = model.workload(&sv.workload)?;
        let peak = trace.rates[i].iter().cloned().fold(0.0, f64::max);
        let scale = if peak > 0.0 {
            cfg.peak_workers * wl.capacity_rps / peak
        } else {
            0.0
        };
        svcs.push(Svc {
            wl,
            scale,
            // The cold strategy starts from the warm parent; clones start fresh at t = 0.
            workers: vec![Worker {
                ready_at: if strategy == Strategy::Cold {
                    -1e9
                } else {
                    0.0
                },
                initial: true,
            }],
            pending: 0,
            scaling: false,
            backlog: 0.0,
            idle_for: 0.0,
            m: ServiceMetrics {
                service: sv.name.clone(),
                strategy: strategy.name().into(),
                peak_workers: 1,
                ..Default::default()
            },
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
            fa: Vec::new(),
            busy: 0.0,
        });
    }
    // Scale-out completions: (ready time in ns, service, count, decision time in ns).
    let mut events: BinaryHeap<Reverse<(u64, usize, usize, u64)>> = BinaryHeap::new();
    let cap_mem = cfg.hosts.map(|h| h as f64 * cfg.host_mem_bytes as f64);
    let cores = cfg.hosts.map(|h| (h * cfg.host_cores) as f64);
    let (mut dc_peak_mem, mut dc_peak_workers, mut refused) = (0f64, 0usize, 0usize);
    let mut mem_now = 0f64;
    let mut busy_prev = 0f64;
    let mut timeline0 = Vec::new();
    let mut t = 0.0;
    // Like the replay, which waits for every request: after the trace, drain the backlogs.
    let drain_end = end + 600.0;
    let mut backlog_left = false;
    while t < end || (backlog_left && t < drain_end) {
        backlog_left = false;
        let t1 = t + dt;
        while let Some(Reverse((at, s, n, _decided))) = events.peek().copied() {
            if at as f64 / 1e9 > t1 {
                break;
            }
            events.pop();
            let sv = &mut svcs[s];
            sv.pending -= n;
            sv.scaling = false;
            let ready = at as f64 / 1e9;
            for _ in 0..n {
                sv.workers.push(Worker {
                    ready_at: ready,
                    initial: false,
                });
            }
        }
        let slow = match cores {
            Some(c) if busy_prev > c => c / busy_prev,
            _ => 1.0,
        };
        let (mut mem_total, mut workers_total, mut busy_total) = (0f64, 0usize, 0f64);
        for (i, sv) in svcs.iter_mut().enumerate() {
            let lambda = if t < end {
                trace.rate_at(i, (t + dt / 2.0) * cfg.compress) * sv.scale
            } else {
                0.0
            };
            let ready: Vec<f64> = sv
                .workers
                .iter()
                .filter(|w| w.ready_at <= t1)
                .map(|w| sm.warm_at(t1 - w.ready_at.max(0.0), bucket) * slow)
                .collect();
            let c = ready.len();
            let frac_sum: f64 = ready.iter().sum();
            let cap = frac_sum * sv.wl.capacity_rps;
            let offered = lambda * dt + sv.backlog;
            let served = offered.min(cap * dt);
            sv.backlog = offered - served;
            if sv.backlog > 0.5 {
                backlog_left = true;
            } else if t >= end {
                sv.backlog = 0.0;
            }
            let frac_avg = if c > 0 { frac_sum / c as f64 } else { 0.0 };
            let svc_p90 = sv.wl.service_p90_ms / frac_avg.max(0.02);
            let svc_mean = sv.wl.service_ms / frac_avg.max(0.02);
            let drain_ms = if cap > 0.0 {
                sv.backlog / cap * 1e3
            } else {
                f64::INFINITY
            };
            let (wait_p90, wait_mean) = if c == 0 || lambda >= cap {
                (drain_ms, drain_ms)
            } else {
                let mu = cap / c as f64;
                let pc = erlang_c(c, lambda / mu);
                let w90 = if pc > 0.1 {
                    (pc / 0.1).ln() / (cap - lambda) * 1e3
                } else {
                    0.0
                };
                (w90 + drain_ms, pc / (cap - lambda) * 1e3 + drain_ms)
            };
            let p90 = svc_p90 + wait_p90;
            let active = lambda > 0.0 || sv.backlog > 0.0;
            if active {
                sv.m.windows += 1;
                if p90 > cfg.slo.p90_ms {
                    sv.m.overloads += 1;
                }
                let n = served.round() as u64;
                if n > 0 {
                    let us = ((svc_mean + wait_mean) * 1e3).clamp(1.0, 3.6e9) as u64;
                    let _ = sv.hist.record_n(us, n);
                    sv.m.requests += n as usize;
                }
            }
            // Usage: serving workers' footprints; vCPU time from the decision.
            let mut mem = 0.0;
            for w in &sv.workers {
                if w.ready_at <= t1 {
                    mem += if w.initial && strategy == Strategy::Cold {
                        sv.wl.parent_bytes
                    } else {
                        sm.footprint_at(t1 - w.ready_at.max(0.0), bucket)
                    };
                }
            }
            sv.m.mem_gib_s += mem / (1u64 << 30) as f64 * dt;
            sv.m.vcpu_s += (sv.workers.len() + sv.pending) as f64 * dt;
            sv.m.peak_workers = sv.m.peak_workers.max(c);
            sv.m.peak_mem_bytes = sv.m.peak_mem_bytes.max(mem as u64);
            mem_total += mem;
            workers_total += c;
            let busy = if sv.wl.capacity_rps > 0.0 {
                (served / dt / sv.wl.capacity_rps).min(c as f64)
            } else {
                0.0
            };
            busy_total += busy;
            sv.busy = busy;
            if i == 0 {
                timeline0.push((t1, lambda, c, p90));
            }
            // Controller.
            let in_flight = sv.backlog + lambda * (svc_mean + wait_mean) / 1e3;
            let per_worker = in_flight / c.max(1) as f64;
            let n_now = sv.workers.len();
            if (p90 > cfg.scale_p90_ms || per_worker > cfg.max_queue)
                && n_now < cfg.max_workers
                && !sv.scaling
            {
                let add = n_now.div_ceil(2).clamp(1, cfg.max_workers - n_now);
                let need = sm.footprint_at(0.0, bucket) * add as f64;
                if cap_mem.is_some_and(|m| mem_now + need > m) {
                    refused += 1;
                } else {
                    let delay = draw(&mut rng, &sm.ready_ms) / 1e3;
                    let at = t1 + delay;
                    events.push(Reverse(((at * 1e9) as u64, i, add, (t1 * 1e9) as u64)));
                    sv.pending += add;
                    sv.scaling = true;
                    sv.m.scale_outs += add;
                    let fa = delay + sv.wl.service_ms / 1e3 / sm.warm_at(0.0, bucket);
                    for _ in 0..add {
                        sv.fa.push(fa * 1e3);
                    }
                }
                sv.idle_for = 0.0;
            } else if c > 1 && !sv.scaling {
                let mu = sv.wl.capacity_rps;
                let overflow = lambda * erlang_b(c - 1, lambda / mu.max(1e-9));
                if overflow * cfg.cooldown_s < 0.5 {
                    sv.idle_for += dt;
                    if sv.idle_for >= cfg.cooldown_s {
                        sv.workers.pop();
                    }
                } else {
                    sv.idle_for = 0.0;
                }
            }
        }
        busy_prev = busy_total;
        mem_now = mem_total;
        dc_peak_mem = dc_peak_mem.max(mem_total);
        dc_peak_workers = dc_peak_workers.max(workers_total);
        tick((t1 / end).min(1.0));
        t = t1;
    }
    let mut services = Vec::with_capacity(svcs.len());
    for sv in &mut svcs {
        if sv.m.requests > 0 {
            sv.m.p50_ms = sv.hist.value_at_quantile(0.5) as f64 / 1e3;
            sv.m.p99_ms = sv.hist.value_at_quantile(0.99) as f64 / 1e3;
        }
        sv.fa.sort_by(f64::total_cmp);
        if !sv.fa.is_empty() {
            sv.m.first_answer_p50_ms = sv.fa[sv.fa.len() / 2];
            sv.m.first_answer_p90_ms = sv.fa[(sv.fa.len() * 9 / 10).min(sv.fa.len() - 1)];
        }
        services.push(std::mem::take(&mut sv.m));
    }
    let totals = super::metrics::totals(strategy.name(), &services);
    Ok(SimRun {
        strategy,
        totals,
        dc_peak_mem_bytes: dc_peak_mem as u64,
        dc_peak_workers,
        hosts_for_peak: (dc_peak_mem / cfg.host_mem_bytes as f64).ceil().max(1.0) as usize,
        refused,
        services: if services.len() <= 64 {
            services
        } else {
            Vec::new()
        },
        timeline0,
    })
}

/// The smallest number of hosts (binary search between 1 and `max_hosts`) with which the
/// strategy keeps overload windows at most `target` of all windows; `None` if even
/// `max_hosts` does not.
pub fn smallest_datacenter(
    trace: &Trace,
    model: &CostModel,
    strategy: Strategy,
    cfg: &SimConfig,
    target: f64,
    max_hosts: usize,
) -> Result<Option<(usize, SimRun)>, ModelError> {
    let run = |h: usize| {
        simulate(
            trace,
            model,
            strategy,
            &SimConfig {
                hosts: Some(h),
                ..cfg.clone()
            },
            |_| {},
        )
    };
    let ok = |r: &SimRun| r.totals.overloads as f64 <= target * r.totals.windows.max(1) as f64;
    let top = run(max_hosts)?;
    if !ok(&top) {
        return Ok(None);
    }
    let (mut lo, mut hi, mut best) = (1usize, max_hosts, top);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let r = run(mid)?;
        if ok(&r) {
            hi = mid;
            best = r;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Some((hi, best)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::model::{StrategyModel, WorkloadModel, MAGIC, VERSION};
    use crate::experiment::trace::ServiceSpec;

    fn model(ready_ms: f64, warm0: f64) -> CostModel {
        let sm = |s| StrategyModel {
            strategy: s,
            ready_ms: vec![ready_ms],
            first_answer_ms: vec![ready_ms],
            warm: vec![warm0, warm0, 1.0],
            footprint: vec![8e6, 16e6],
            samples: 1,
        };
        CostModel {
            magic: MAGIC.into(),
            version: VERSION,
            bucket_s: 0.5,
            strategies: vec![sm(Strategy::Cold), sm(Strategy::Kaleidoscope)],
            workloads: vec![WorkloadModel {
                workload: "web".into(),
                capacity_rps: 100.0,
                service_ms: 5.0,
                service_p90_ms: 8.0,
                parent_bytes: 32e6,
            }],
            source: "test".into(),
        }
    }

    fn bursty() -> Trace {
        let mut r = vec![1.0; 60];
        for x in &mut r[20..40] {
            *x = 100.0;
        }
        Trace {
            step_s: 1.0,
            services: vec![ServiceSpec {
                name: "a".into(),
                workload: "web".into(),
                mix_seed: 1,
            }],
            rates: vec![r],
        }
    }

    #[test]
    fn erlang_formulas() {
        assert!((erlang_b(1, 1.0) - 0.5).abs() < 1e-12);
        assert!((erlang_c(1, 0.5) - 0.5).abs() < 1e-12);
        assert!(erlang_c(4, 1.0) < erlang_c(2, 1.0));
    }

    #[test]
    fn slow_instantiation_overloads_more() {
        let cfg = SimConfig {
            compress: 1.0,
            ..SimConfig::default()
        };
        let fast = simulate(
            &bursty(),
            &model(20.0, 0.8),
            Strategy::Kaleidoscope,
            &cfg,
            |_| {},
        )
        .unwrap();
        let slow = simulate(
            &bursty(),
            &model(5000.0, 0.2),
            Strategy::Kaleidoscope,
            &cfg,
            |_| {},
        )
        .unwrap();
        assert!(fast.totals.windows > 100);
        assert!(fast.services[0].scale_outs > 0);
        assert!(
            slow.totals.overloads > fast.totals.overloads,
            "slow {} vs fast {}",
            slow.totals.overloads,
            fast.totals.overloads
        );
        // The burst is over: workers were released.
        assert!(fast.timeline0.last().unwrap().2 < fast.totals.peak_workers);
    }

    #[test]
    fn full_hosts_refuse_scale_outs() {
        let cfg = SimConfig {
            compress: 1.0,
            hosts: Some(1),
            host_mem_bytes: 20_000_000,
            ..SimConfig::default()
        };
        let r = simulate(
            &bursty(),
            &model(20.0, 0.8),
            Strategy::Kaleidoscope,
            &cfg,
            |_| {},
        )
        .unwrap();
        assert!(r.refused > 0);
        let big = smallest_datacenter(
            &bursty(),
            &model(20.0, 0.8),
            Strategy::Kaleidoscope,
            &SimConfig {
                host_mem_bytes: 20_000_000,
                ..cfg
            },
            0.5,
            64,
        )
        .unwrap()
        .expect("64 hosts suffice");
        assert!(big.0 >= 1);
    }
}
