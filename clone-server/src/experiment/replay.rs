//! `kscope experiment replay`: real VMs on this host replaying a load trace, one elastic load
//! balancer per service ([`crate::lb`]), every scaling strategy on the same arrivals.
//!
//! 1. Start the clone service in-process (an ephemeral port) and, per service, boot its warm
//!    parent, warm it with the service's request mix and measure one warm worker's capacity.
//!    For the recorded-working-set policies, one lazy clone per service records the mix.
//! 2. Turn the trace into arrivals: time is compressed by `compress` (trace seconds per
//!    replay second) and each service's rates are scaled so that its peak needs `peak_workers`
//!    warm workers of the measured capacity. The arrivals are built once, with a seed, and
//!    every strategy replays exactly them.
//! 3. Per strategy, run the K load balancers at once (each scales its own workers: cold boots
//!    of new VMs, or clones of the warm parent with the strategy's memory mode and policy),
//!    sampling every worker's real footprint each window; then delete the workers.
//! 4. Per strategy and service, compute the metrics ([`super::metrics`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::metrics::{service_metrics, ServiceMetrics, Slo};
use super::trace::Trace;
use super::Strategy;
use crate::lb::client::ApiClient;
use crate::lb::load::Arrival;
use crate::lb::{self, LbOptions, LbReport, Source};
use crate::server::{self, Limits, ServeOptions};

/// What to replay and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayConfig {
    /// Strategies, in the order they run.
    pub strategies: Vec<Strategy>,
    /// Trace seconds per replay second.
    pub compress: f64,
    /// Replay at most this long per strategy (s); the trace is cut.
    pub max_s: f64,
    /// A service's peak rate needs this many warm workers.
    pub peak_workers: f64,
    /// Guest memory per VM.
    pub mem: String,
    /// Overload definition.
    pub slo: Slo,
    /// Balancer: scale out when the window's p90 exceeds this (ms).
    pub scale_p90_ms: f64,
    /// Balancer: scale out when requests in flight per worker exceed this.
    pub max_queue: f64,
    /// Balancer window (ms).
    pub window_ms: f64,
    /// Balancer: delete a worker idle this long (ms).
    pub cooldown_ms: f64,
    /// Most workers per service.
    pub max_workers: usize,
    /// Requests that warm each parent (and that the recorders serve).
    pub warm_requests: usize,
    /// Seed of the arrivals.
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            strategies: Strategy::ALL.to_vec(),
            compress: 60.0,
            max_s: 60.0,
            peak_workers: 1.5,
            mem: "64M".into(),
            slo: Slo::default(),
            scale_p90_ms: 50.0,
            max_queue: 2.0,
            window_ms: 500.0,
            cooldown_ms: 2000.0,
            max_workers: 8,
            warm_requests: 200,
            seed: 1,
        }
    }
}

/// One service's setup, measured before the strategies run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSetup {
    /// Service name.
    pub name: String,
    /// Workload.
    pub workload: String,
    /// Warm parent's capacity (req/s, `CAPACITY_WINDOW` requests in flight).
    pub capacity_rps: f64,
    /// Warm parent's median latency at one request in flight (ms).
    pub service_ms: f64,
    /// Its 90th percentile (ms).
    pub service_p90_ms: f64,
    /// Mean in-VM service time of the warm parent (ms, from the guest's latency header).
    #[serde(default)]
    pub vm_service_ms: f64,
    /// Warm parent boot (API call, ms).
    pub parent_boot_ms: f64,
    /// Warm parent's footprint after warming (bytes): the template every clone shares.
    pub parent_footprint_bytes: u64,
    /// Rate scale applied to the trace.
    pub rate_scale: f64,
    /// Requests replayed.
    pub arrivals: usize,
}

/// One strategy's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StrategyRun {
    /// Strategy.
    pub strategy: Strategy,
    /// Per service (same order as the setup).
    pub services: Vec<ServiceMetrics>,
    /// The balancers' reports (timelines, worker logs).
    pub reports: Vec<serde_json::Value>,
    /// Wall time of the run (s).
    pub wall_s: f64,
}

/// The whole replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Configuration.
    pub config: ReplayConfig,
    /// The trace replayed (after selection and cutting).
    pub trace: Trace,
    /// Per-service setup.
    pub setup: Vec<ServiceSetup>,
    /// Per strategy.
    pub runs: Vec<StrategyRun>,
    /// Cores of this host.
    pub host_cores: usize,
}

/// Requests in flight when measuring a parent's capacity.
pub const CAPACITY_WINDOW: usize = 4;

/// Arrivals of service `s` (thinning of a Poisson process at the peak rate).
pub fn arrivals_for(
    trace: &Trace,
    s: usize,
    compress: f64,
    rate_scale: f64,
    max_s: f64,
    seed: u64,
    payloads: &[Vec<u8>],
) -> Vec<Arrival> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed ^ (s as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let end = (trace.duration_s() / compress).min(max_s);
    let peak = trace.rates[s].iter().cloned().fold(0.0, f64::max) * compress * rate_scale;
    let mut out = Vec::new();
    if peak <= 0.0 || payloads.is_empty() {
        return out;
    }
    // Rates are per trace second; a replay second holds `compress` trace seconds, so the
    // replay rate is rate * rate_scale (rate_scale already maps the peak to worker capacity).
    let peak = peak / compress;
    let mut t = 0.0;
    loop {
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        t += -u.ln() / peak;
        if t >= end {
            break;
        }
        let r = trace.rate_at(s, t * compress) * rate_scale;
        if rng.random::<f64>() * peak <= r {
            out.push(Arrival {
                at: Duration::from_secs_f64(t),
                payload: payloads[out.len() % payloads.len()].clone(),
            });
        }
    }
    out
}

async fn measure(
    api: &ApiClient,
    id: &str,
    reqs: &[Vec<u8>],
    window: usize,
) -> anyhow::Result<(f64, Vec<Duration>, f64)> {
    let t0 = Instant::now();
    let mut lat = Vec::new();
    let mut vm_us = 0u64;
    for chunk in reqs.chunks(window.max(1)) {
        let mut set = tokio::task::JoinSet::new();
        for r in chunk {
            let (api, id, r) = (api.clone(), id.to_string(), r.clone());
            set.spawn(async move {
                let t = Instant::now();
                let res = api.request(&id, &r).await;
                (res, t.elapsed())
            });
        }
        while let Some(j) = set.join_next().await {
            let (res, d) = j.context("request task")?;
            let (status, us, _) = res?;
            anyhow::ensure!(status == 0, "VM {id} answered guest status {status}");
            vm_us += us;
            lat.push(d);
        }
    }
    Ok((
        reqs.len() as f64 / t0.elapsed().as_secs_f64(),
        lat,
        vm_us as f64 / reqs.len().max(1) as f64 / 1e3,
    ))
}

async fn footprint(api: &ApiClient, id: &str) -> u64 {
    api.json(Method::GET, &format!("/v1/vms/{id}/stats"), None)
        .await
        .map(|v| v["memory"]["footprint_bytes"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

/// Run the replay; `progress` is told each finished (strategy, service) pair.
pub async fn run(
    trace: &Trace,
    cfg: &ReplayConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(cfg.compress > 0.0, "--compress must be > 0");
    anyhow::ensure!(!cfg.strategies.is_empty(), "no strategies to compare");
    anyhow::ensure!(!trace.services.is_empty(), "the trace has no services");
    let k = trace.services.len();
    let srv = server::start(ServeOptions {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        token: Some(format!("kscope-experiment-{:016x}", rand::random::<u64>())),
        limits: Limits {
            max_vms: k * (cfg.max_workers + 2) + 4,
            max_clones: k * (cfg.max_workers * 2 + 4),
            max_guest_mem: 16 << 30,
            ..Limits::default()
        },
        ..ServeOptions::default()
    })
    .await
    .context("starting the clone service in-process")?;
    let base = format!("http://{}", srv.addr());
    let api = ApiClient::new(&base, Some(srv.token().to_string()));
    let result = run_with(&api, &base, srv.token(), trace, cfg, progress).await;
    server::stop_all(srv.state()).await;
    let _ = srv.shutdown().await;
    result
}

async fn run_with(
    api: &ApiClient,
    base: &str,
    token: &str,
    trace: &Trace,
    cfg: &ReplayConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ReplayReport> {
    let k = trace.services.len();
    let needs_recording = cfg.strategies.iter().any(|s| s.needs_recording());
    let mut setup = Vec::with_capacity(k);
    let mut parents = Vec::with_capacity(k);
    let mut recorders = Vec::with_capacity(k);
    let mut arrivals = Vec::with_capacity(k);
    for (s, sv) in trace.services.iter().enumerate() {
        let w = sv.workload();
        let t0 = Instant::now();
        let v = api
            .json(
                Method::POST,
                "/v1/vms",
                Some(&json!({ "workload": w.name(), "memory": cfg.mem })),
            )
            .await
            .with_context(|| format!("booting the parent of {}", sv.name))?;
        let boot_ms = t0.elapsed().as_secs_f64() * 1e3;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let mix = w.requests(sv.mix_seed, 512);
        let warm: Vec<Vec<u8>> = mix
            .iter()
            .cycle()
            .take(cfg.warm_requests)
            .cloned()
            .collect();
        measure(api, &id, &warm, CAPACITY_WINDOW)
            .await
            .with_context(|| format!("warming {}", sv.name))?;
        let (cap, _, _) = measure(api, &id, &warm, CAPACITY_WINDOW).await?;
        let (_, lat1, vm_ms) = measure(api, &id, &warm[..warm.len().min(50)], 1).await?;
        let lat1 = kscope_vmm::summary::LatencySummary::of(&lat1);
        // Before any clone: afterwards the parent runs on a private view of the frozen image.
        let parent_bytes = footprint(api, &id).await;
        if needs_recording {
            let v = api
                .json(
                    Method::POST,
                    &format!("/v1/vms/{id}/clones"),
                    Some(&json!({ "n": 1, "memory_mode": "lazy", "prefetch": "lazy" })),
                )
                .await
                .with_context(|| format!("the recording clone of {}", sv.name))?;
            let rid = v["clones"][0]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            measure(api, &rid, &warm, CAPACITY_WINDOW)
                .await
                .with_context(|| format!("recording the working set of {}", sv.name))?;
            recorders.push(Some(rid));
        } else {
            recorders.push(None);
        }
        let peak = trace.rates[s].iter().cloned().fold(0.0, f64::max);
        let rate_scale = if peak > 0.0 {
            cfg.peak_workers * cap / peak
        } else {
            0.0
        };
        let a = arrivals_for(
            trace,
            s,
            cfg.compress,
            rate_scale,
            cfg.max_s,
            cfg.seed,
            &mix,
        );
        setup.push(ServiceSetup {
            name: sv.name.clone(),
            workload: w.name().to_string(),
            capacity_rps: cap,
            service_ms: lat1.p50_us / 1e3,
            service_p90_ms: lat1.p90_us / 1e3,
            vm_service_ms: vm_ms,
            parent_boot_ms: boot_ms,
            parent_footprint_bytes: parent_bytes,
            rate_scale,
            arrivals: a.len(),
        });
        progress(&format!(
            "{}: parent {id} warm, {cap:.0} req/s, {} arrivals",
            sv.name,
            a.len()
        ));
        parents.push(id);
        arrivals.push(Arc::new(a));
    }

    let mut runs = Vec::new();
    for &strategy in &cfg.strategies {
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for s in 0..k {
            let (scale, memory_mode, prefetch) = strategy.lb_mode();
            let opts = LbOptions {
                api: base.to_string(),
                token: token.to_string(),
                workload: trace.services[s].workload(),
                memory: cfg.mem.clone(),
                parent: Some(parents[s].clone()),
                source: Source::Arrivals(arrivals[s].clone()),
                min_workers: 1,
                max_workers: cfg.max_workers,
                p90_target: Duration::from_secs_f64(cfg.scale_p90_ms / 1e3),
                max_queue: cfg.max_queue,
                cooldown: Duration::from_secs_f64(cfg.cooldown_ms / 1e3),
                window: Duration::from_secs_f64(cfg.window_ms / 1e3),
                scale,
                memory_mode: memory_mode.into(),
                prefetch: prefetch.into(),
                cleanup: true,
                recording_from: if strategy.needs_recording() {
                    recorders[s].clone()
                } else {
                    None
                },
                account: true,
                tcp: false,
                front: Default::default(),
            };
            set.spawn(async move { (s, lb::run_lb(opts).await) });
        }
        let mut reports: Vec<Option<LbReport>> = vec![None; k];
        while let Some(j) = set.join_next().await {
            let (s, r) = j.context("load balancer task")?;
            let r = r.with_context(|| {
                format!(
                    "strategy {} service {}",
                    strategy.name(),
                    trace.services[s].name
                )
            })?;
            progress(&format!(
                "{} {}: {} requests, p99 {:.1} ms, max {} workers",
                strategy.name(),
                trace.services[s].name,
                r.requests,
                r.latency.p99_us / 1e3,
                r.max_workers
            ));
            reports[s] = Some(r);
        }
        let reports: Vec<LbReport> = reports.into_iter().flatten().collect();
        let services = reports
            .iter()
            .zip(&setup)
            .map(|(r, st)| service_metrics(&st.name, r, &cfg.slo, cfg.window_ms / 1e3, strategy))
            .collect();
        runs.push(StrategyRun {
            strategy,
            services,
            reports: reports
                .iter()
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .collect(),
            wall_s: t0.elapsed().as_secs_f64(),
        });
    }
    for r in recorders.into_iter().flatten() {
        let _ = api
            .json(Method::DELETE, &format!("/v1/vms/{r}"), None)
            .await;
    }
    for p in parents {
        let _ = api
            .json(Method::DELETE, &format!("/v1/vms/{p}"), None)
            .await;
    }
    let cut_steps = ((cfg.max_s * cfg.compress) / trace.step_s).ceil() as usize;
    let mut used = trace.clone();
    for r in &mut used.rates {
        r.truncate(cut_steps.max(1));
    }
    Ok(ReplayReport {
        config: cfg.clone(),
        trace: used,
        setup,
        runs,
        host_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::trace::ServiceSpec;

    #[test]
    fn arrivals_follow_the_compressed_scaled_trace() {
        let t = Trace {
            step_s: 60.0,
            services: vec![ServiceSpec {
                name: "a".into(),
                workload: "web".into(),
                mix_seed: 1,
            }],
            rates: vec![vec![10.0, 0.0, 40.0, 20.0]],
        };
        // 60x compression: each trace minute is one replay second; scale 2.
        let a = arrivals_for(&t, 0, 60.0, 2.0, 100.0, 7, &[b"x".to_vec()]);
        let count = |lo: f64, hi: f64| {
            a.iter()
                .filter(|x| (lo..hi).contains(&x.at.as_secs_f64()))
                .count() as f64
        };
        assert_eq!(count(1.0, 2.0), 0.0);
        assert!(a.iter().all(|x| x.at.as_secs_f64() < 4.0));
        // Expected 20, 80, 40 requests in seconds 0, 2, 3 (Poisson: within 4 sigma).
        for (lo, want) in [(0.0, 20.0), (2.0, 80.0), (3.0, 40.0)] {
            let got = count(lo, lo + 1.0);
            assert!(
                (got - want).abs() <= 4.0 * f64::sqrt(want),
                "{lo}: {got} vs {want}"
            );
        }
        let cut = arrivals_for(&t, 0, 60.0, 2.0, 2.5, 7, &[b"x".to_vec()]);
        assert!(cut.iter().all(|x| x.at.as_secs_f64() < 2.5));
    }
}
