//! `kscope bench warmup`: how fast a clone of a warm parent becomes warm under each prefetch
//! policy (Kaleidoscope's warm-up experiment), all measured on one parent in one run.
//!
//! 1. Boot the workload, warm it with a request mix, then measure the warm parent's throughput
//!    on the measured stream (the baseline); pause and freeze it once ([`Vm::freeze`]): every
//!    clone is spawned from that one generation, which is colored once, before any clone runs
//!    (the coloring time is reported apart).
//! 2. Record the working set (first-fault order) of one lazy clone driven with the recording
//!    stream: the measured stream itself, or for the working-set-change case another input
//!    ([`ws_streams`], as in FaaSnap). In the plain case the `lazy` run doubles as recording.
//! 3. Per policy, clone the parent (lazy memory + the policy's prefetcher) and drive the clone
//!    with the measured stream, every response checked: time to first response, time until a
//!    sliding window of completions reaches 90% of the parent's throughput
//!    ([`time_to_fraction`]), time of the first K requests, throughput over time, blocking
//!    faults, pages installed, wasted prefetch (installed, not in the touched set of the `lazy`
//!    run of the same stream: [`wasted`]) and footprint.
//!
//! All times are measured from the [`Generation::spawn`](kscope_vmm::Generation::spawn) call
//! (the freeze and the coloring are done once, before, and reported separately, as in the
//! paper).
//!
//! **Time to warm** is measured as the time a clone *loses* to warming up: its time from the
//! clone call to its K-th response minus the time a warm clone of the same generation (every
//! page installed before its first instruction, the `upfront` policy) takes from its first
//! request to its K-th ([`PolicyResult::warm_cost_ms`]). It counts, it does not detect a
//! threshold crossing, so a burst does not decide it. Clones run in rounds: each round runs
//! one warm reference and one clone of every policy, so that drift in the machine's speed
//! falls on every policy alike; a clone's cost is taken against its own round's reference.
//! (The threshold time, [`time_to_fraction`], is still reported beside it.)

mod report;

pub use report::{goals, render};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kscope_policies::{color_generation, factory, Gfn, PolicyContext, PolicyName, PolicySpec};
use kscope_vmm::lazy::Bitmap;
use kscope_vmm::{CloneOptions, Generation, MemoryMode};
use kscope_workloads::{ImageOptions, Workload};
use serde::Serialize;

use crate::runner::{self, drive, DriveReport};

/// What to run.
#[derive(Clone, Debug)]
pub struct WarmupConfig {
    /// The workload.
    pub workload: Workload,
    /// Policies to compare (`lazy` is added if missing: it is the reference).
    pub policies: Vec<PolicySpec>,
    /// Rounds: each runs a warm reference clone and one clone per policy; the report gives
    /// medians over the rounds.
    pub clones: usize,
    /// Requests per measured stream (K).
    pub requests: usize,
    /// Requests in flight.
    pub window: usize,
    /// Guest memory.
    pub mem_bytes: u64,
    /// Record with one input and run with another.
    pub ws_change: bool,
    /// Fraction of the warm throughput that counts as warm (the threshold time).
    pub warm_fraction: f64,
    /// How long each clone's fault handler polls for the next fault before it sleeps
    /// ([`CloneOptions::fault_spin`]).
    pub fault_spin: Duration,
}

/// One policy's measurements (medians over its clones).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyResult {
    /// Policy spec.
    pub policy: String,
    /// Clones measured.
    pub clones: usize,
    /// `clone_children` call to the clone's first `KVM_RUN`.
    pub clone_ms: f64,
    /// Call to the first response.
    pub first_response_ms: f64,
    /// Call to reaching `warm_fraction` of the parent's throughput (None: never in K requests).
    pub time_to_warm_ms: Option<f64>,
    /// Call to the K-th response.
    pub first_k_ms: f64,
    /// Time to warm: `first_k_ms` minus the warm reference's time from its first request to
    /// its K-th response, in the same round (0 = as fast as a warm clone, clone call
    /// included).
    pub warm_cost_ms: f64,
    /// [min, median, max] of `warm_cost_ms` over the clones.
    pub warm_cost_spread: [f64; 3],
    /// The time to warm of each round, in round order (paired across policies: the same
    /// index is the same round, against the same warm reference).
    pub round_costs: Vec<f64>,
    /// Blocking faults per color of the faulting frame (first round; colors without faults
    /// left out): where a policy leaves its faults.
    pub faults_by_color: std::collections::BTreeMap<String, u64>,
    /// Faults that blocked a vCPU.
    pub blocking_faults: u64,
    /// Time vCPUs were blocked in faults.
    pub blocked_ms: f64,
    /// Faulting pages installed with data.
    pub fault_pages: u64,
    /// Pages installed ahead of a fault (prefetch, before resume, background).
    pub prefetched_pages: u64,
    /// Pages installed as zeros.
    pub zero_filled: u64,
    /// Distinct pages present in the clone at the end (everything it was given).
    pub installed_pages: u64,
    /// Pages copied (bytes copied / 4 KiB).
    pub copied_pages: u64,
    /// Installed pages outside the touched set of the `lazy` run of the same stream.
    pub wasted_pages: u64,
    /// `installed_pages` / touched pages of the `lazy` run.
    pub installed_per_touched: f64,
    /// Host memory of the clone at the end.
    pub footprint_bytes: u64,
    /// Throughput over time of the first clone: (seconds since the call, requests/s).
    pub curve: Vec<(f64, f64)>,
    /// Requests served from the clone call until the horizon (`WarmupReport::horizon_ms`, half
    /// the warm parent's time for the K requests), over what the warm parent serves in that
    /// time: the clone's throughput over the horizon relative to the warm parent (1.0 = as
    /// fast as the parent, clone call included). Robust to bursts: it counts, it does not
    /// detect a crossing.
    pub served_ratio: f64,
    /// [min, median, max] of `served_ratio` over the clones.
    pub served_ratio_spread: [f64; 3],
    /// Throughput in fixed windows of `WarmupReport::slot_ms` from the clone call, relative
    /// to the warm parent (median per window over the clones; a window after the stream ended
    /// is left out).
    pub window_ratios: Vec<f64>,
}

/// Everything `kscope bench warmup` reports.
#[derive(Clone, Debug, Serialize)]
pub struct WarmupReport {
    /// Workload.
    pub workload: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Requests per measured stream.
    pub requests: usize,
    /// Requests in flight.
    pub window: usize,
    /// Working-set-change case.
    pub ws_change: bool,
    /// Description of the streams.
    pub streams: String,
    /// The warm parent on the measured stream.
    pub parent: DriveReport,
    /// Its throughput (the 100% line).
    pub parent_rps: f64,
    /// Half the warm parent's time for the measured K requests: the horizon of `served_ratio`.
    pub horizon_ms: f64,
    /// The warm references (one per round, all memory installed before the first
    /// instruction): first request to K-th response, [min, median, max].
    pub reference_k_ms: [f64; 3],
    /// The warm reference's K-request time in each round, in round order.
    pub reference_rounds: Vec<f64>,
    /// Length of the fixed windows of `window_ratios`.
    pub slot_ms: f64,
    /// Completions per sliding window.
    pub rate_window: usize,
    /// Warm threshold.
    pub warm_fraction: f64,
    /// Pages touched by the recording clone (the reap/faasnap/activeset recording).
    pub recorded_pages: u64,
    /// Pages touched by the `lazy` run of the measured stream.
    pub touched_pages: u64,
    /// Time to color the generation image.
    pub color_ms: f64,
    /// Per policy, in the order given.
    pub policies: Vec<PolicyResult>,
    /// The goals, evaluated.
    pub goals: Vec<Goal>,
}

/// A goal of the issue and whether this run meets it.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// What is claimed.
    pub goal: String,
    /// Met, not met, or not measured (missing policy / case).
    pub met: Option<bool>,
    /// The numbers behind it.
    pub evidence: String,
}

/// The first time a sliding window of `win` completions runs at `fraction * target_rps` or
/// more: completion times are since the start; the start counts as a completion at 0 so a
/// clone that is warm at once qualifies at its `win`-th completion.
pub fn time_to_fraction(
    completions: &[Duration],
    target_rps: f64,
    fraction: f64,
    win: usize,
) -> Option<Duration> {
    let win = win.max(1);
    let times: Vec<Duration> = std::iter::once(Duration::ZERO)
        .chain(completions.iter().copied())
        .collect();
    (win..times.len()).find_map(|i| {
        let dt = (times[i] - times[i - win]).as_secs_f64();
        let rate = win as f64 / dt.max(1e-9);
        (rate >= fraction * target_rps).then_some(times[i])
    })
}

/// Sliding-window throughput after every completion from the `win`-th on: `(t, rps)`, with
/// `offset` added to the times.
pub fn rate_curve(completions: &[Duration], win: usize, offset: Duration) -> Vec<(f64, f64)> {
    let win = win.max(1);
    let times: Vec<Duration> = std::iter::once(Duration::ZERO)
        .chain(completions.iter().copied())
        .collect();
    (win..times.len())
        .map(|i| {
            let dt = (times[i] - times[i - win]).as_secs_f64().max(1e-9);
            ((times[i] + offset).as_secs_f64(), win as f64 / dt)
        })
        .collect()
}

/// Requests completed by `t` since the clone call; completion times are since the start of
/// driving, which began `offset` after the call.
pub fn served_by(completions: &[Duration], offset: Duration, t: Duration) -> usize {
    completions.iter().filter(|&&c| offset + c <= t).count()
}

/// Throughput in consecutive windows of `slot` from the clone call, as a fraction of
/// `target_rps`; only windows that end before the last completion (the stream was still
/// running) are reported.
pub fn window_ratios(
    completions: &[Duration],
    offset: Duration,
    slot: Duration,
    target_rps: f64,
) -> Vec<f64> {
    let Some(&last) = completions.last() else {
        return Vec::new();
    };
    let end = offset + last;
    let slot_s = slot.as_secs_f64().max(1e-9);
    let mut out = Vec::new();
    let mut j = 0u32;
    while slot * (j + 1) <= end {
        let (a, b) = (slot * j, slot * (j + 1));
        let n = completions
            .iter()
            .filter(|&&c| offset + c > a && offset + c <= b)
            .count();
        out.push(n as f64 / slot_s / target_rps.max(1e-9));
        j += 1;
    }
    out
}

/// Pages installed in a clone (`present`) that a lazy run of the same stream never touched.
pub fn wasted(present: &Bitmap, touched: &Bitmap) -> u64 {
    present.iter_set().filter(|&g| !touched.get(g)).count() as u64
}

/// Recording stream, measured stream and their description.
pub type Streams = (Vec<Vec<u8>>, Vec<Vec<u8>>, String);

/// Record and run streams of `n` requests for `w`: the same mix (seed 2) for both, or with
/// `ws_change` two different inputs drawn from the workload's mix (json small vs large, aes and
/// compress small vs whole input, matmul n=48 vs 256, olap Q6 vs Q1, web static files vs
/// dynamic pages). Returns `(record, run, description)`.
pub fn ws_streams(w: Workload, n: usize, ws_change: bool) -> anyhow::Result<Streams> {
    if !ws_change {
        let s = w.requests(2, n);
        return Ok((
            s.clone(),
            s,
            "record = run = the standard mix (seed 2)".into(),
        ));
    }
    let pool = kscope_workloads::requests(w, &ImageOptions::default(), 3, n * 40 + 200);
    let text = |r: &Vec<u8>| String::from_utf8_lossy(r).into_owned();
    type Pred = fn(&str) -> bool;
    let (rec, run, what): (Pred, Pred, &str) = match w {
        Workload::Json => (
            |s| s.trim() == "small",
            |s| s.trim() == "large",
            "record json small, run json large",
        ),
        Workload::Aes => (
            |s| s.starts_with("kib=4 "),
            |s| !s.starts_with("kib=4 "),
            "record aes 4 KiB, run aes whole input",
        ),
        Workload::Compress => (
            |s| s.starts_with("kib=16 "),
            |s| !s.starts_with("kib=16 "),
            "record compress 16 KiB, run compress whole corpus",
        ),
        Workload::Matmul => (
            |s| s.starts_with("n=48 "),
            |s| s.starts_with("n=256 "),
            "record matmul n=48, run matmul n=256",
        ),
        Workload::Olap => (
            |s| s.starts_with("Q6"),
            |s| s.starts_with("Q1 "),
            "record olap Q6, run olap Q1",
        ),
        Workload::Web => (
            |s| s.starts_with("GET /dir") || s.starts_with("HEAD /dir"),
            |s| {
                ["/bank/", "/shop/", "/support/"].iter().any(|p| {
                    s.split_whitespace()
                        .nth(1)
                        .is_some_and(|u| u.starts_with(p))
                })
            },
            "record web static files, run web bank/shop/support pages",
        ),
    };
    let pick = |p: Pred| -> Vec<Vec<u8>> {
        pool.iter()
            .filter(|r| p(&text(r)))
            .take(n)
            .cloned()
            .collect()
    };
    let (a, b) = (pick(rec), pick(run));
    if a.len() < n || b.len() < n {
        bail!(
            "the {} mix yields only {}/{} requests of the two inputs; ask for fewer requests",
            w.name(),
            a.len(),
            b.len()
        );
    }
    Ok((a, b, what.into()))
}

/// A measured clone run.
struct CloneRun {
    result: PolicyResult,
    /// First request to K-th response (ms).
    k_ms: f64,
    present: Bitmap,
    touched: Bitmap,
    order: Vec<Gfn>,
}

/// How clones of one parent are measured.
struct Measure<'a> {
    generation: &'a Arc<Generation>,
    w: Workload,
    window: usize,
    rate_window: usize,
    target_rps: f64,
    fraction: f64,
    horizon: Duration,
    slot: Duration,
}

impl Measure<'_> {
    /// Spawn one clone of the parent's generation with `opts` and drive it with `reqs`.
    fn run(&self, opts: &CloneOptions, reqs: &[Vec<u8>]) -> anyhow::Result<CloneRun> {
        run_clone(self, opts, reqs)
    }
}

fn run_clone(me: &Measure<'_>, opts: &CloneOptions, reqs: &[Vec<u8>]) -> anyhow::Result<CloneRun> {
    let (generation, w, window, rate_window, target_rps, fraction) = (
        me.generation,
        me.w,
        me.window,
        me.rate_window,
        me.target_rps,
        me.fraction,
    );
    let t_call = Instant::now();
    let mut batch = generation
        .spawn(1, opts)
        .context("cloning the warm parent")?;
    let child = batch.children.pop().context("no clone made")?;
    let t_drive = Instant::now();
    let rep = drive(&child, w, reqs, window, true)
        .with_context(|| format!("driving clone {}", child.name()))?;
    let offset = t_drive - t_call;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let m = child.memory_stats();
    let server = child
        .fault_server()
        .context("the clone is not lazily served")?;
    let present = server.present_bitmap();
    let touched = server.touched_bitmap();
    let order = server.touched();
    let result = PolicyResult {
        clones: 1,
        clone_ms: ms(batch.clone_latency[0]),
        first_response_ms: ms(offset + rep.completions[0]),
        time_to_warm_ms: time_to_fraction(&rep.completions, target_rps, fraction, rate_window)
            .map(|d| ms(d + offset)),
        first_k_ms: ms(offset + *rep.completions.last().context("no completions")?),
        blocking_faults: m.faults,
        blocked_ms: ms(m.blocked),
        fault_pages: m.pages_fetched,
        prefetched_pages: m.pages_prefetched,
        zero_filled: m.zero_filled,
        installed_pages: present.count(),
        copied_pages: m.bytes / 4096,
        footprint_bytes: m.footprint_bytes,
        curve: rate_curve(&rep.completions, rate_window, offset),
        served_ratio: served_by(&rep.completions, offset, me.horizon) as f64
            / (target_rps * me.horizon.as_secs_f64()).max(1e-9),
        window_ratios: window_ratios(&rep.completions, offset, me.slot, target_rps),
        ..Default::default()
    };
    child.stop().context("stopping the clone")?;
    Ok(CloneRun {
        k_ms: ms(*rep.completions.last().context("no completions")?),
        result,
        present,
        touched,
        order,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// [min, median, max] of `v` (zeros if empty).
fn spread(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(&lo), Some(&hi)) => [lo, median(v.clone()), hi],
        _ => [0.0; 3],
    }
}

/// Median of each metric over the runs of one policy; the curve of the first run.
fn summarize(policy: &str, runs: &[PolicyResult]) -> PolicyResult {
    let f = |g: fn(&PolicyResult) -> f64| median(runs.iter().map(g).collect());
    let u = |g: fn(&PolicyResult) -> u64| {
        let mut v: Vec<u64> = runs.iter().map(g).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let warm: Vec<Option<f64>> = runs.iter().map(|r| r.time_to_warm_ms).collect();
    let reached: Vec<f64> = warm.iter().flatten().copied().collect();
    PolicyResult {
        policy: policy.to_string(),
        clones: runs.len(),
        clone_ms: f(|r| r.clone_ms),
        first_response_ms: f(|r| r.first_response_ms),
        // Warm in the median run only if most runs got warm.
        time_to_warm_ms: (reached.len() * 2 > warm.len()).then(|| median(reached)),
        first_k_ms: f(|r| r.first_k_ms),
        warm_cost_ms: f(|r| r.warm_cost_ms),
        warm_cost_spread: spread(runs.iter().map(|r| r.warm_cost_ms).collect()),
        round_costs: runs.iter().map(|r| r.warm_cost_ms).collect(),
        faults_by_color: runs
            .first()
            .map(|r| r.faults_by_color.clone())
            .unwrap_or_default(),
        blocking_faults: u(|r| r.blocking_faults),
        blocked_ms: f(|r| r.blocked_ms),
        fault_pages: u(|r| r.fault_pages),
        prefetched_pages: u(|r| r.prefetched_pages),
        zero_filled: u(|r| r.zero_filled),
        installed_pages: u(|r| r.installed_pages),
        copied_pages: u(|r| r.copied_pages),
        wasted_pages: u(|r| r.wasted_pages),
        installed_per_touched: f(|r| r.installed_per_touched),
        footprint_bytes: u(|r| r.footprint_bytes),
        curve: runs.first().map(|r| r.curve.clone()).unwrap_or_default(),
        served_ratio: f(|r| r.served_ratio),
        served_ratio_spread: spread(runs.iter().map(|r| r.served_ratio).collect()),
        window_ratios: {
            let n = runs
                .iter()
                .map(|r| r.window_ratios.len())
                .max()
                .unwrap_or(0);
            (0..n)
                .map(|j| {
                    median(
                        runs.iter()
                            .filter_map(|r| r.window_ratios.get(j).copied())
                            .collect(),
                    )
                })
                .collect()
        },
    }
}

/// Run the benchmark.
pub fn run(cfg: &WarmupConfig) -> anyhow::Result<WarmupReport> {
    let w = cfg.workload;
    let k = cfg.requests.max(2);
    let mut specs = cfg.policies.clone();
    if !specs.iter().any(|s| s.name == PolicyName::Lazy) {
        specs.insert(0, "lazy".parse().expect("lazy parses"));
    }
    // Lazy first: its touched set is the reference for wasted prefetch (and, without a
    // working-set change, the recording).
    specs.sort_by_key(|s| s.name != PolicyName::Lazy);
    let (record, measured, streams) = ws_streams(w, k, cfg.ws_change)?;

    let b = runner::boot(w, cfg.mem_bytes, &format!("{}-warmup", w.name()))?;
    let parent = b.vm;
    // Warm with the standard mix, or with the recording input when the input changes (every
    // request a VM serves counts against guest memory, so the parent serves 2K before cloning).
    let warm = if cfg.ws_change {
        record.clone()
    } else {
        w.requests(1, k)
    };
    drive(&parent, w, &warm, cfg.window, true).context("warming the parent")?;
    let base = drive(&parent, w, &measured, cfg.window, true).context("parent baseline")?;
    let parent_rps = base.throughput_rps;
    // The horizon of the served-ratio metric: half the parent's time for the K requests, so a
    // clone as fast as the parent is still busy at the horizon (the ratio does not saturate);
    // fixed windows of a fifth of it.
    let horizon = Duration::from_secs_f64(base.elapsed_ms / 2e3);
    let slot = horizon / 5;
    parent.pause().context("pausing the warm parent")?;
    let generation = parent.freeze().context("freezing the warm parent")?;
    let (map, color_time) =
        color_generation(&generation).context("coloring the parent's generation image")?;
    let ctx = PolicyContext::new(&map);
    let rate_window = (k / 10).max(5).min(k);
    let lazy_opts = CloneOptions {
        memory: MemoryMode::Lazy,
        fault_spin: cfg.fault_spin,
        ..CloneOptions::default()
    };
    let m = Measure {
        generation: &generation,
        w,
        window: cfg.window,
        rate_window,
        target_rps: parent_rps,
        fraction: cfg.warm_fraction,
        horizon,
        slot,
    };
    let go = |opts: &CloneOptions, reqs: &[Vec<u8>]| m.run(opts, reqs);

    // The recording clone.
    let rec_run = go(&lazy_opts, &record)?;
    let recording: Arc<[Gfn]> = rec_run.order.clone().into();
    let recorded_pages = recording.len() as u64;

    let opts = specs
        .iter()
        .map(|spec| {
            Ok(CloneOptions {
                memory: MemoryMode::Lazy,
                prefetcher: factory(spec, Some(ctx.clone()), Some(recording.clone()))
                    .with_context(|| format!("policy {}", spec.name))?,
                fault_spin: cfg.fault_spin,
                ..CloneOptions::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The warm reference: every page installed before the clone's first instruction.
    let upfront: PolicySpec = "upfront".parse().context("the upfront policy")?;
    let reference = CloneOptions {
        memory: MemoryMode::Lazy,
        prefetcher: factory(&upfront, Some(ctx.clone()), None).context("policy upfront")?,
        ..CloneOptions::default()
    };
    let mut touched_ref: Option<Bitmap> = None;
    let mut runs: Vec<Vec<PolicyResult>> = vec![Vec::new(); specs.len()];
    let mut reference_k = Vec::new();
    // Rounds: a warm reference, then one clone per policy (`lazy` first).
    for round in 0..cfg.clones.max(1) {
        let warm_ref = go(&reference, &measured).context("the warm reference clone")?;
        reference_k.push(warm_ref.k_ms);
        for ((spec, opts), runs) in specs.iter().zip(&opts).zip(runs.iter_mut()) {
            // Without a working-set change the recording clone is the first lazy run.
            let r = if spec.name == PolicyName::Lazy && round == 0 && !cfg.ws_change {
                CloneRun {
                    result: rec_run.result.clone(),
                    k_ms: rec_run.k_ms,
                    present: rec_run.present.clone(),
                    touched: rec_run.touched.clone(),
                    order: rec_run.order.clone(),
                }
            } else {
                go(opts, &measured).with_context(|| format!("policy {}", spec.name))?
            };
            if spec.name == PolicyName::Lazy && touched_ref.is_none() {
                touched_ref = Some(r.touched.clone());
            }
            let t = touched_ref.as_ref().expect("lazy runs first");
            let mut res = r.result;
            for &g in r.order.iter().filter(|&&g| g < ctx.frames()) {
                *res.faults_by_color
                    .entry(ctx.color(g).name().to_string())
                    .or_default() += 1;
            }
            res.wasted_pages = wasted(&r.present, t);
            res.installed_per_touched = res.installed_pages as f64 / t.count().max(1) as f64;
            res.warm_cost_ms = res.first_k_ms - warm_ref.k_ms;
            runs.push(res);
        }
    }
    let results: Vec<PolicyResult> = specs
        .iter()
        .zip(&runs)
        .map(|(spec, runs)| summarize(&spec.label(), runs))
        .collect();
    let _ = parent.stop();
    let touched_pages = touched_ref.map_or(0, |t| t.count());
    let goals = goals(&results, cfg.ws_change);
    Ok(WarmupReport {
        workload: w.name().to_string(),
        mem_mib: cfg.mem_bytes >> 20,
        requests: k,
        window: cfg.window,
        ws_change: cfg.ws_change,
        streams,
        parent: base,
        parent_rps,
        horizon_ms: horizon.as_secs_f64() * 1e3,
        reference_k_ms: spread(reference_k.clone()),
        reference_rounds: reference_k,
        slot_ms: slot.as_secs_f64() * 1e3,
        rate_window,
        warm_fraction: cfg.warm_fraction,
        recorded_pages,
        touched_pages,
        color_ms: color_time.as_secs_f64() * 1e3,
        policies: results,
        goals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn time_to_fraction_finds_the_first_fast_window() {
        // Slow at first (100 ms per request), then 10 ms per request.
        let c = ms(&[100, 200, 300, 310, 320, 330, 340]);
        // Target 100 req/s, 90% => 90 req/s over 2 completions: 300->320 is 2/0.02 = 100.
        assert_eq!(
            time_to_fraction(&c, 100.0, 0.9, 2),
            Some(Duration::from_millis(320))
        );
        // Never that fast.
        assert_eq!(time_to_fraction(&c, 1000.0, 0.9, 2), None);
        // Warm at once: the start counts as a completion.
        let c = ms(&[10, 20, 30]);
        assert_eq!(
            time_to_fraction(&c, 100.0, 0.9, 2),
            Some(Duration::from_millis(20))
        );
        assert_eq!(time_to_fraction(&[], 1.0, 0.9, 2), None);
    }

    #[test]
    fn curve_is_offset_and_windowed() {
        let c = ms(&[100, 200, 300]);
        let k = rate_curve(&c, 2, Duration::from_millis(50));
        assert_eq!(k.len(), 2);
        assert!((k[0].0 - 0.25).abs() < 1e-9 && (k[0].1 - 10.0).abs() < 1e-6);
        assert!((k[1].0 - 0.35).abs() < 1e-9 && (k[1].1 - 10.0).abs() < 1e-6);
    }

    #[test]
    fn fixed_windows_and_served_by_count_from_the_call() {
        // Driving began 100 ms after the call; completions at 150..=400 ms since the call.
        let c = ms(&[50, 100, 150, 200, 250, 300]);
        let off = Duration::from_millis(100);
        assert_eq!(served_by(&c, off, Duration::from_millis(99)), 0);
        assert_eq!(served_by(&c, off, Duration::from_millis(250)), 3);
        assert_eq!(served_by(&c, off, Duration::from_secs(1)), 6);
        // 100 ms windows against 20 req/s (2 per window = 1.0): [0,100] none, (100,200] 2,
        // (200,300] 2, (300,400] 2; nothing after the last completion.
        let w = window_ratios(&c, off, Duration::from_millis(100), 20.0);
        assert_eq!(w.len(), 4);
        assert!(w[0].abs() < 1e-9);
        for x in &w[1..] {
            assert!((x - 1.0).abs() < 1e-9, "{w:?}");
        }
        assert!(window_ratios(&[], off, Duration::from_millis(100), 20.0).is_empty());
    }

    #[test]
    fn wasted_counts_installed_but_untouched() {
        let mut present = Bitmap::new(16);
        let mut touched = Bitmap::new(16);
        for g in [1, 2, 3, 8, 9] {
            present.set(g);
        }
        for g in [2, 3, 4, 9] {
            touched.set(g);
        }
        assert_eq!(wasted(&present, &touched), 2);
        assert_eq!(wasted(&touched, &touched), 0);
    }

    #[test]
    fn ws_streams_split_inputs() {
        for w in Workload::ALL {
            let (a, b, _) = ws_streams(w, 8, true).unwrap();
            assert_eq!((a.len(), b.len()), (8, 8));
            assert!(a.iter().all(|r| !b.contains(r)), "{}", w.name());
        }
        let (a, b, _) = ws_streams(Workload::Olap, 5, false).unwrap();
        assert_eq!(a, b);
    }
}
