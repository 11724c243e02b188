//! `kscope bench clone`: the cloning figures of issue 11 per guest size, each printed as a
//! ratio against its goal (or, for throughput, against the warm parent of the same run).
//!
//! Per size and repetition: boot a `web` parent, warm it, measure its throughput for one
//! second, then
//! 1. clone it once (lazy): the parent's pause and the call -> child's first instruction;
//!    the child's requests served in its first second against the parent's second;
//! 2. drive the parent again (it dirties memory), clone it once more: the later pause;
//! 3. clone it `n` times in one call: call -> all children running.
//!
//! A size whose parent cannot be booted (e.g. 4 GiB on a small host) is skipped with the reason.

use std::time::{Duration, Instant};

use anyhow::Context;
use std::sync::Arc;

use kscope_vmm::pool::{ShellKey, ShellPool};
use kscope_vmm::{CloneOptions, Vm};
use kscope_workloads::Workload;
use serde::Serialize;

use crate::runner;

/// Options of the run.
#[derive(Debug, Clone)]
pub struct CloneBenchConfig {
    /// Guest sizes in bytes.
    pub sizes: Vec<u64>,
    /// Repetitions per size.
    pub reps: usize,
    /// Children of the batch clone.
    pub batch: usize,
    /// Requests that warm the parent (and that it serves between the first and later clone).
    pub warm_requests: usize,
    /// Length of the throughput windows (parent and first clone).
    pub window: Duration,
    /// Shells in the pool of the pooled measurements (0: measure without a pool only).
    pub pool: usize,
}

/// One figure: median over repetitions with min and max, and its goal.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What is measured.
    pub name: String,
    /// Unit of the values.
    pub unit: String,
    /// [min, median, max] over the repetitions.
    pub value: [f64; 3],
    /// The goal (issue 11).
    pub goal: f64,
    /// True when smaller is better (the goal is an upper bound).
    pub lower_is_better: bool,
}

impl Figure {
    /// Median against the goal: <= 1 meets an upper bound, >= 1 meets a lower bound.
    pub fn ratio(&self) -> f64 {
        self.value[1] / self.goal
    }
    /// Whether the median meets the goal.
    pub fn met(&self) -> bool {
        if self.lower_is_better {
            self.value[1] <= self.goal
        } else {
            self.value[1] >= self.goal
        }
    }
}

/// One guest size's figures, or why it was skipped.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The figures (empty when skipped).
    pub figures: Vec<Figure>,
    /// Why the size was skipped.
    pub skipped: Option<String>,
    /// Where a child's creation time went in the n-clone calls: per phase, the mean over
    /// every child of every repetition, in ms (see [`kscope_vmm::SpawnBreakdown`]).
    pub breakdown: Vec<(String, f64)>,
    /// The same for the n-clone calls from the pool (the last entry of both is the share of
    /// children that came from a pooled shell).
    pub pooled_breakdown: Vec<(String, f64)>,
    /// Where the parent's first and later (dirtied) freezes went: per part, the median over
    /// the repetitions, in ms (pages: the later layer's pages).
    pub freezes: Vec<(String, Vec<(String, f64)>)>,
}

/// The parts of a freeze report, in ms (and the layer's pages).
fn freeze_parts(f: &kscope_vmm::FreezeReport) -> Vec<(String, f64)> {
    [
        ("stop", ms(f.stop_vcpus)),
        ("capture", ms(f.capture)),
        ("memory", ms(f.memory)),
        ("pause", ms(f.pause)),
        ("after-resume", ms(f.after_resume)),
        ("pages", f.pages_protected as f64),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect()
}

/// Per part, the median over `reports`.
fn median_parts(reports: &[kscope_vmm::FreezeReport]) -> Vec<(String, f64)> {
    let all: Vec<Vec<(String, f64)>> = reports.iter().map(freeze_parts).collect();
    let Some(first) = all.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let v = all.iter().map(|p| p[i].1).collect();
            (name.clone(), spread(v)[1])
        })
        .collect()
}

/// Samples of one repetition, in [`NAMES`] order.
type Sample = [f64; 27];

/// One-clone calls per repetition and mode (their median is the repetition's value).
const SINGLES: usize = 5;

/// Index of the first pooled figure in [`NAMES`].
const POOLED: usize = 10;

/// Index of the n-clone call on the direct path in [`NAMES`].
const DIRECT_BATCH: usize = 8;

const NAMES: [(&str, &str, f64, bool); 27] = [
    ("parent pause, first clone", "ms", 1.0, true),
    ("  before: slot re-point", "ms", 1.0, true),
    ("  standby VM / slot re-point", "x", 0.0, true),
    ("parent pause, later clone (dirtied)", "ms", 1.0, true),
    ("pages copied in later pause", "pages", 0.0, true),
    ("first clone: call -> first instruction", "ms", 1.0, true),
    ("  before: re-point, no pool", "ms", 1.0, true),
    ("  now / before", "x", 0.0, true),
    // The direct path (no pool, each child started when made); the goal is judged here only
    // without a pool, else on the pooled rows below.
    ("n clones: call -> all running (no pool)", "ms", 64.0, true),
    ("clone 1st-second throughput / parent", "x", 0.8, false),
    // Same run, later generations of the same parent, without then with the pool; n-clone
    // calls with each child started when made (the default) or all started together.
    ("no pool: later call -> first instr.", "ms", 1.0, true),
    ("pool: later call -> first instr.", "ms", 1.0, true),
    ("  pool / no pool", "x", 0.0, true),
    ("no pool: spawn -> first instr.", "ms", 1.0, true),
    ("pool: spawn -> first instr.", "ms", 1.0, true),
    ("  pool / no pool (spawn)", "x", 0.0, true),
    ("no pool: n clones -> all running", "ms", 64.0, true),
    ("no pool, together: n -> all running", "ms", 64.0, true),
    ("pool: n clones -> all running", "ms", 64.0, true),
    ("pool, together: n -> all running", "ms", 64.0, true),
    ("  pool / no pool (n clones)", "x", 0.0, true),
    ("  pool, together / no pool (n clones)", "x", 0.0, true),
    ("pool, together: n clones: first child", "ms", 0.0, true),
    ("pool: host memory per shell", "MiB", 0.0, true),
    ("first freeze: standby made on the call", "ms", 0.0, true),
    // Same run: the later pause of the baseline parent (re-point, so its writes are found
    // by scanning page tables, and every later layer holds all of them).
    ("  later pause before: scanned, full layer", "ms", 1.0, true),
    ("  later pause recorded / scanned full", "x", 0.0, true),
];

/// The host's MemAvailable in MiB (for the pool's memory cost).
fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The pooled figures of one repetition (see [`NAMES`] from [`POOLED`] on).
struct Pooled {
    /// Freezing the parent for one later clone (median).
    freeze: f64,
    /// Spawn -> first instruction of one clone, without and with the pool (medians).
    direct_spawn: f64,
    pooled_spawn: f64,
    /// n clones -> all running: [no pool, no pool together, pool, pool together].
    batch: [f64; 4],
    /// The first child's call -> first instruction, pool, together.
    together_first: f64,
    mib_per_shell: f64,
}

/// Without then with a pool of `cfg.pool` shells: a later clone's call -> first instruction,
/// and `cfg.batch` clones' call -> all running, each started when made or all together; the
/// pool's memory cost per shell.
fn pooled_rep(
    cfg: &CloneBenchConfig,
    parent: &Vm,
    (pool, mib_per_shell): (Arc<ShellPool>, f64),
    parts: &mut Vec<kscope_vmm::SpawnBreakdown>,
) -> anyhow::Result<Pooled> {
    let direct = CloneOptions::default();
    let key = shell_key(parent);
    let fill = POOL_FILL;
    let pooled = CloneOptions {
        pool: Some(pool.clone()),
        ..CloneOptions::default()
    };
    // One clone per call, alternating without and with the pool, SINGLES times each: the
    // freeze (the same work either way) and the spawn -> first instruction are timed apart.
    let mut singles: [Vec<f64>; 3] = Default::default();
    for _ in 0..SINGLES {
        for (i, opts) in [&direct, &pooled].into_iter().enumerate() {
            pool.wait_ready(key, cfg.pool, fill);
            let t = Instant::now();
            let gen = parent.freeze().context("freezing for a later clone")?;
            let frozen = t.elapsed();
            let one = gen.spawn(1, opts).context("a later clone")?;
            singles[i].push(ms(one.clone_latency[0]));
            singles[2].push(ms(frozen));
        }
    }
    let median = |v: &[f64]| spread(v.to_vec())[1];
    let (direct_spawn, pooled_spawn, freeze) = (
        median(&singles[0]),
        median(&singles[1]),
        median(&singles[2]),
    );
    let mut batch = [0.0; 4];
    let mut together_first = 0.0;
    for (i, (use_pool, together)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let opts = CloneOptions {
            start_together: together,
            pool: use_pool.then(|| pool.clone()),
            ..CloneOptions::default()
        };
        if use_pool {
            pool.wait_ready(key, cfg.pool, fill);
        }
        let b = parent.clone_children(cfg.batch, &opts).with_context(|| {
            format!(
                "{} clones in one call (pool {use_pool}, together {together})",
                cfg.batch
            )
        })?;
        let all = ms(b.clone_latency.iter().max().copied().unwrap_or_default());
        batch[[0, 2, 1, 3][i]] = all;
        if use_pool && together {
            parts.extend_from_slice(&b.breakdown);
            together_first = ms(b.clone_latency.iter().min().copied().unwrap_or_default());
        }
    }
    drop(pool);
    Ok(Pooled {
        freeze,
        direct_spawn,
        pooled_spawn,
        batch,
        together_first,
        mib_per_shell,
    })
}

/// How long a pool may take to fill.
const POOL_FILL: Duration = Duration::from_secs(120);

fn shell_key(vm: &Vm) -> ShellKey {
    ShellKey {
        mem_bytes: vm.mem_bytes(),
        vcpus: vm.config().vcpus,
    }
}

/// A full pool of `cfg.pool` shells for `key` and the host memory each one costs (MiB).
fn full_pool(cfg: &CloneBenchConfig, key: ShellKey) -> anyhow::Result<(Arc<ShellPool>, f64)> {
    let before = mem_available_mib();
    let pool = Arc::new(ShellPool::new(cfg.pool).context("starting the VM pool")?);
    pool.prepare(key);
    let ready = pool.wait_ready(key, cfg.pool, POOL_FILL);
    anyhow::ensure!(
        ready >= cfg.pool,
        "the VM pool made {ready} of {} shells in {POOL_FILL:?}: {}",
        cfg.pool,
        pool.last_error().unwrap_or_default()
    );
    Ok((pool, (before - mem_available_mib()) / cfg.pool as f64))
}

/// The baseline, as before the standby VM, the pool and recorded layers: a fresh parent,
/// warmed the same way, whose first freeze re-points its KVM slot, cloned once without a
/// pool, then driven the same way and cloned again with a full layer found by a scan. Returns
/// (first pause, first call -> first instruction, later pause) in ms.
fn clones_before(cfg: &CloneBenchConfig, mem: u64, rep: usize) -> anyhow::Result<(f64, f64, f64)> {
    let b = runner::boot(
        Workload::Web,
        mem,
        &format!("bench-clone-{}m-{rep}-before", mem >> 20),
    )?;
    let warm = Workload::Web.requests(11 + rep as u64, cfg.warm_requests.max(1));
    runner::drive(&b.vm, Workload::Web, &warm, 4, true).context("warming the baseline parent")?;
    b.vm.set_first_freeze_by_repoint(true);
    b.vm.set_full_layers(true);
    let first =
        b.vm.clone_children(1, &CloneOptions::default())
            .context("first clone of the baseline parent")?;
    for c in &first.children {
        c.stop()?;
    }
    runner::drive(&b.vm, Workload::Web, &warm, 4, true).context("dirtying the baseline")?;
    let later =
        b.vm.clone_children(1, &CloneOptions::default())
            .context("later clone of the baseline parent")?;
    for c in &later.children {
        c.stop()?;
    }
    b.vm.stop()?;
    Ok((
        ms(first.parent_pause),
        ms(first.clone_latency[0]),
        ms(later.parent_pause),
    ))
}

/// Requests served by `vm` in `dur` (window of 4 in flight), all answers checked.
fn served_in(vm: &Vm, reqs: &[Vec<u8>], dur: Duration) -> anyhow::Result<usize> {
    let start = Instant::now();
    let mut served = 0;
    let chunk = 4;
    let mut i = 0;
    while start.elapsed() < dur {
        let end = (i + chunk).min(reqs.len());
        let offset = start.elapsed();
        let r = runner::drive(vm, Workload::Web, &reqs[i..end], chunk, true)?;
        served += r.completions.iter().filter(|&&c| offset + c <= dur).count();
        i = if end >= reqs.len() { 0 } else { end };
    }
    Ok(served)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn one_rep(
    cfg: &CloneBenchConfig,
    mem: u64,
    rep: usize,
    parts: &mut Vec<kscope_vmm::SpawnBreakdown>,
    pooled_parts: &mut Vec<kscope_vmm::SpawnBreakdown>,
    freezes: &mut [Vec<kscope_vmm::FreezeReport>; 2],
) -> anyhow::Result<Sample> {
    let b = runner::boot(
        Workload::Web,
        mem,
        &format!("bench-clone-{}m-{rep}", mem >> 20),
    )?;
    let parent = &b.vm;
    let warm = Workload::Web.requests(11 + rep as u64, cfg.warm_requests.max(1));
    let reqs = Workload::Web.requests(1000 + rep as u64, 4096);
    runner::drive(parent, Workload::Web, &warm, 4, true).context("warming the parent")?;
    // As `kscope serve` does after a boot: the standby VM of the first freeze, made ahead.
    parent
        .prepare_freeze()
        .context("making the parent's standby VM")?;
    let parent_served = served_in(parent, &reqs, cfg.window).context("parent throughput")?;

    // The first clone from the pool when there is one.
    let pool = if cfg.pool > 0 {
        Some(full_pool(cfg, shell_key(parent))?)
    } else {
        None
    };
    let opts = CloneOptions {
        pool: pool.as_ref().map(|(p, _)| p.clone()),
        ..CloneOptions::default()
    };
    let first = parent.clone_children(1, &opts).context("first clone")?;
    let child_served =
        served_in(&first.children[0], &reqs, cfg.window).context("first clone's throughput")?;
    for c in &first.children {
        c.stop()?;
    }
    drop(first.children);
    let opts = CloneOptions::default();

    runner::drive(parent, Workload::Web, &warm, 4, true).context("dirtying the parent")?;
    let later = parent.clone_children(1, &opts).context("later clone")?;
    for c in &later.children {
        c.stop()?;
    }
    freezes[0].push(first.freeze);
    freezes[1].push(later.freeze);

    let batch = parent
        .clone_children(cfg.batch, &opts)
        .with_context(|| format!("{} clones in one call", cfg.batch))?;
    let all_running = batch
        .clone_latency
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    parts.extend_from_slice(&batch.breakdown);
    for c in &batch.children {
        c.stop()?;
    }
    drop(batch);
    let p = if let Some(pool) = pool {
        pooled_rep(cfg, parent, pool, pooled_parts)?
    } else {
        Pooled {
            freeze: f64::NAN,
            direct_spawn: f64::NAN,
            pooled_spawn: f64::NAN,
            batch: [f64::NAN; 4],
            together_first: f64::NAN,
            mib_per_shell: f64::NAN,
        }
    };
    parent.stop()?;
    drop(b);
    let (before_pause, before_call, before_later) = clones_before(cfg, mem, rep)?;
    let call = ms(first.clone_latency[0]);
    Ok([
        ms(first.parent_pause),
        before_pause,
        ms(first.parent_pause) / before_pause,
        ms(later.parent_pause),
        later.freeze.pages_copied as f64,
        call,
        before_call,
        call / before_call,
        ms(all_running),
        child_served as f64 / parent_served.max(1) as f64,
        p.freeze + p.direct_spawn,
        p.freeze + p.pooled_spawn,
        (p.freeze + p.pooled_spawn) / (p.freeze + p.direct_spawn),
        p.direct_spawn,
        p.pooled_spawn,
        p.pooled_spawn / p.direct_spawn,
        p.batch[0],
        p.batch[1],
        p.batch[2],
        p.batch[3],
        p.batch[2] / p.batch[0],
        p.batch[3] / p.batch[0],
        p.together_first,
        p.mib_per_shell,
        ms(first.freeze.prepare),
        before_later,
        ms(later.parent_pause) / before_later,
    ])
}

fn spread(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    [v[0], v[v.len() / 2], v[v.len() - 1]]
}

/// Per phase, the mean over `parts` in ms.
fn mean_phases(parts: &[kscope_vmm::SpawnBreakdown]) -> Vec<(String, f64)> {
    let Some(p) = parts.first() else {
        return Vec::new();
    };
    p.phases()
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let sum: f64 = parts.iter().map(|b| ms(b.phases()[i].1)).sum();
            (name.to_string(), sum / parts.len() as f64)
        })
        .chain(std::iter::once((
            "pooled share".to_string(),
            parts.iter().filter(|b| b.pooled).count() as f64 / parts.len() as f64,
        )))
        .collect()
}

/// Measure every size.
pub fn run(cfg: &CloneBenchConfig) -> anyhow::Result<Vec<SizeReport>> {
    let mut out = Vec::new();
    for &mem in &cfg.sizes {
        let mut samples: Vec<Sample> = Vec::new();
        let mut skipped = None;
        let mut parts = Vec::new();
        let mut pooled_parts = Vec::new();
        let mut freezes: [Vec<kscope_vmm::FreezeReport>; 2] = Default::default();
        for rep in 0..cfg.reps.max(1) {
            match one_rep(cfg, mem, rep, &mut parts, &mut pooled_parts, &mut freezes) {
                Ok(s) => samples.push(s),
                Err(e) => {
                    skipped = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let figures = if skipped.is_some() {
            Vec::new()
        } else {
            NAMES
                .iter()
                .enumerate()
                .filter(|(i, _)| cfg.pool > 0 || *i < POOLED)
                .map(|(i, &(name, unit, goal, lower))| Figure {
                    name: name
                        .replace("n clones", &format!("{} clones", cfg.batch))
                        .replace(": n ->", &format!(": {} ->", cfg.batch)),
                    unit: unit.to_string(),
                    value: spread(samples.iter().map(|s| s[i]).collect()),
                    goal: match goal {
                        _ if i == DIRECT_BATCH && cfg.pool > 0 => 0.0,
                        64.0 => cfg.batch as f64,
                        _ => goal,
                    },
                    lower_is_better: lower,
                })
                .collect()
        };
        out.push(SizeReport {
            mem_mib: mem >> 20,
            figures,
            skipped,
            breakdown: mean_phases(&parts),
            pooled_breakdown: mean_phases(&pooled_parts),
            freezes: vec![
                ("first freeze".into(), median_parts(&freezes[0])),
                ("later freeze (dirtied)".into(), median_parts(&freezes[1])),
            ],
        });
    }
    Ok(out)
}

/// The report as a table.
pub fn render(r: &[SizeReport]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for size in r {
        let _ = writeln!(s, "guest {} MiB", size.mem_mib);
        if let Some(why) = &size.skipped {
            let _ = writeln!(s, "  skipped: {why}");
            continue;
        }
        let _ = writeln!(
            s,
            "  {:<40} {:>5} {:>26} {:>8} {:>8}",
            "figure", "unit", "median (min-max)", "goal", "/goal"
        );
        for f in &size.figures {
            let goal = if f.goal == 0.0 {
                "-".to_string()
            } else {
                format!("{}{}", if f.lower_is_better { "<" } else { ">=" }, f.goal)
            };
            let ratio = if f.goal == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}{}", f.ratio(), if f.met() { "" } else { " !" })
            };
            let _ = writeln!(
                s,
                "  {:<40} {:>5} {:>26} {:>8} {:>8}",
                f.name,
                f.unit,
                format!("{:.2} ({:.2}-{:.2})", f.value[1], f.value[0], f.value[2]),
                goal,
                ratio
            );
        }
        for (what, b) in [
            ("no pool", &size.breakdown),
            ("pool", &size.pooled_breakdown),
        ] {
            let Some(((_, share), phases)) = b.split_last() else {
                continue;
            };
            let total: f64 = phases.iter().map(|(_, v)| v).sum();
            let _ = write!(
                s,
                "  per child, {what} ({:.0}% pooled), mean ms: total {total:.2} =",
                share * 100.0
            );
            for (name, v) in phases {
                let _ = write!(s, " {name} {v:.2}");
            }
            let _ = writeln!(s);
        }
        for (what, parts) in &size.freezes {
            let _ = write!(s, "  {what}, median ms:");
            for (name, v) in parts {
                let _ = write!(s, " {name} {v:.2}");
            }
            let _ = writeln!(s);
        }
    }
    s
}
