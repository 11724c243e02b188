//! `kscope experiment`: traces (generate, import), the real replay, cost models and the
//! datacenter-scale simulation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::experiment::gen::{self, GenParams};
use crate::experiment::import::{import_invocations, ImportOptions};
use crate::experiment::metrics::{totals, Slo, Totals};
use crate::experiment::model::CostModel;
use crate::experiment::replay::{self, ReplayConfig, ReplayReport};
use crate::experiment::report;
use crate::experiment::sim::{self, SimConfig, SimRun};
use crate::experiment::trace::Trace;
use crate::experiment::Strategy;

/// `kscope experiment` subcommands.
#[derive(Subcommand, Debug)]
pub enum ExperimentCmd {
    /// Generate an AT&T-style load trace (seeded) and print its statistics.
    Generate(GenerateArgs),
    /// Convert a per-minute invocation-count CSV (Azure Functions layout) into a trace.
    Import(ImportArgs),
    /// Replay a trace on real VMs, one elastic load balancer per service, every strategy.
    Replay(ReplayArgs),
    /// Derive the simulation's cost model from a replay result.
    Model(ModelArgs),
    /// Simulate a datacenter (thousands of services, hours) with a measured cost model.
    Simulate(SimulateArgs),
}

/// Generator parameters on the command line.
#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// Services.
    #[arg(long, default_value_t = 100)]
    pub services: usize,
    /// Trace length (s).
    #[arg(long, default_value_t = 86_400.0)]
    pub duration_s: f64,
    /// Rate sample length (s).
    #[arg(long, default_value_t = 60.0)]
    pub step_s: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Bursts per hour per service.
    #[arg(long)]
    pub bursts_per_hour: Option<f64>,
    /// Diurnal amplitude (0..1).
    #[arg(long)]
    pub diurnal_amp: Option<f64>,
    /// Log-rate noise standard deviation.
    #[arg(long)]
    pub noise_sigma: Option<f64>,
    /// Log-rate noise lag-1 autocorrelation per step.
    #[arg(long)]
    pub noise_rho: Option<f64>,
    /// Median of the services' mean rates (req/s).
    #[arg(long)]
    pub rate_median: Option<f64>,
}

impl GenArgs {
    fn params(&self) -> GenParams {
        let d = GenParams::default();
        GenParams {
            services: self.services,
            duration_s: self.duration_s,
            step_s: self.step_s,
            seed: self.seed,
            bursts_per_hour: self.bursts_per_hour.unwrap_or(d.bursts_per_hour),
            diurnal_amp: self.diurnal_amp.unwrap_or(d.diurnal_amp),
            noise_sigma: self.noise_sigma.unwrap_or(d.noise_sigma),
            noise_rho: self.noise_rho.unwrap_or(d.noise_rho),
            rate_median: self.rate_median.unwrap_or(d.rate_median),
            ..d
        }
    }
}

/// Arguments of `kscope experiment generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    gen: GenArgs,
    /// Output trace file.
    #[arg(long, short)]
    out: PathBuf,
}

/// Arguments of `kscope experiment import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The per-minute invocation-count CSV (HashOwner,HashApp,HashFunction,Trigger,1..1440).
    #[arg(long)]
    invocations: PathBuf,
    /// Keep the busiest N functions (0: all).
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Multiply every rate by this.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Output trace file.
    #[arg(long, short)]
    out: PathBuf,
}

/// Balancer and SLO settings shared by replay and simulation.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// Trace seconds per replayed second.
    #[arg(long, default_value_t = 60.0)]
    compress: f64,
    /// Longest run per strategy (s, replay time).
    #[arg(long, default_value_t = 60.0)]
    max_s: f64,
    /// Each service's peak rate needs this many warm workers.
    #[arg(long, default_value_t = 1.5)]
    peak_workers: f64,
    /// SLO: a window whose p90 latency exceeds this (ms) is an overload.
    #[arg(long, default_value_t = 100.0)]
    slo_ms: f64,
    /// Scale out when the window's p90 exceeds this (ms).
    #[arg(long, default_value_t = 50.0)]
    scale_p90_ms: f64,
    /// Scale out when requests in flight per worker exceed this.
    #[arg(long, default_value_t = 2.0)]
    max_queue: f64,
    /// Balancer window (ms).
    #[arg(long, default_value_t = 500.0)]
    window_ms: f64,
    /// Delete a worker idle this long (ms).
    #[arg(long, default_value_t = 2000.0)]
    cooldown_ms: f64,
    /// Most workers per service.
    #[arg(long, default_value_t = 8)]
    max_workers: usize,
    /// Strategies: all, or a list of cold, eager, lazy, kaleidoscope, reap, faasnap, learned.
    #[arg(long, default_value = "all")]
    strategies: String,
}

/// Arguments of `kscope experiment replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Trace file (default: a generated trace of `--services` services: web, olap, json, ...).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Services to replay (the first K of the trace, or of the generated one).
    #[arg(long, default_value_t = 3)]
    services: usize,
    /// Trace length to generate (s) when no trace is given.
    #[arg(long, default_value_t = 3600.0)]
    gen_duration_s: f64,
    /// Seed of the generated trace and of the arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bursts per hour per service of the generated trace.
    #[arg(long, default_value_t = 4.0)]
    bursts_per_hour: f64,
    #[command(flatten)]
    ctl: ControlArgs,
    /// Guest memory per VM.
    #[arg(long, default_value = "64M")]
    mem: String,
    /// Output directory (JSON, CSV, SVG, Markdown).
    #[arg(long, default_value = "experiment-out")]
    out: PathBuf,
}

/// Arguments of `kscope experiment model`.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A replay result (replay.json).
    #[arg(long)]
    replay: PathBuf,
    /// Output cost model.
    #[arg(long, short)]
    out: PathBuf,
}

/// Arguments of `kscope experiment simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Cost model: a `kscope experiment model` file or a replay result (replay.json).
    #[arg(long)]
    model: PathBuf,
    /// Trace file (default: generated with the generator options).
    #[arg(long)]
    trace: Option<PathBuf>,
    #[command(flatten)]
    gen: GenArgs,
    #[command(flatten)]
    ctl: ControlArgs,
    /// Hosts (default: unlimited).
    #[arg(long)]
    hosts: Option<usize>,
    /// Memory per host (GiB).
    #[arg(long, default_value_t = 24.0)]
    host_mem_gib: f64,
    /// Cores per host.
    #[arg(long, default_value_t = 2)]
    host_cores: usize,
    /// Find the smallest datacenter meeting this overload fraction for each of these SLOs (ms).
    #[arg(long, value_delimiter = ',')]
    slo_sweep: Vec<f64>,
    /// Overload target (fraction of windows) for the smallest datacenter.
    #[arg(long, default_value_t = 0.01)]
    overload_target: f64,
    /// Most hosts to try in the search.
    #[arg(long, default_value_t = 4096)]
    max_hosts: usize,
    /// Validate against this replay: simulate its trace with its settings and compare.
    #[arg(long)]
    validate: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "experiment-out")]
    out: PathBuf,
}

/// Run an experiment subcommand.
pub fn experiment(cmd: ExperimentCmd) -> anyhow::Result<()> {
    match cmd {
        ExperimentCmd::Generate(a) => generate(a),
        ExperimentCmd::Import(a) => {
            let t = import_invocations(
                &a.invocations,
                &ImportOptions {
                    top: a.top,
                    scale: a.scale,
                },
            )?;
            t.save(&a.out)?;
            println!(
                "{} functions x {} minutes -> {}",
                t.services.len(),
                t.steps(),
                a.out.display()
            );
            Ok(())
        }
        ExperimentCmd::Replay(a) => replay_cmd(a),
        ExperimentCmd::Model(a) => {
            let m = CostModel::load(&a.replay)?;
            m.save(&a.out)?;
            print_model(&m);
            Ok(())
        }
        ExperimentCmd::Simulate(a) => simulate_cmd(a),
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let p = a.gen.params();
    let (t, bursts) = gen::generate(&p)?;
    t.save(&a.out)?;
    let l = gen::agile_lifetimes(&t, gen::AGILE_WORKER_RPS, gen::AGILE_COOLDOWN_S);
    let under = l.iter().filter(|x| **x < 3600.0).count() as f64 / l.len().max(1) as f64;
    let d: Vec<f64> = bursts.iter().map(|b| b.duration_s).collect();
    println!(
        "{} services x {} steps of {} s -> {}\nbursts: {} (median {:.0} s, p90 {:.0} s)\nagile-cloud worker lifetimes ({} workers of {} req/s, {} s cool-down): median {:.1} min, {:.0}% under 1 h (AT&T: ~10 min, 85%)",
        t.services.len(),
        t.steps(),
        t.step_s,
        a.out.display(),
        bursts.len(),
        gen::quantile(&d, 0.5),
        gen::quantile(&d, 0.9),
        l.len(),
        gen::AGILE_WORKER_RPS,
        gen::AGILE_COOLDOWN_S,
        gen::quantile(&l, 0.5) / 60.0,
        under * 100.0
    );
    Ok(())
}

fn replay_trace(a: &ReplayArgs) -> anyhow::Result<Trace> {
    let t = match &a.trace {
        Some(p) => Trace::load(p)?,
        None => {
            let (mut t, _) = gen::generate(&GenParams {
                services: a.services,
                duration_s: a.gen_duration_s,
                seed: a.seed,
                // A burst-heavy hour, so that a minute of replay sees several bursts.
                bursts_per_hour: a.bursts_per_hour,
                ..GenParams::default()
            })?;
            // A mix: web, olap and functions, in turn.
            const KINDS: [&str; 6] = ["web", "olap", "json", "aes", "matmul", "compress"];
            for (i, s) in t.services.iter_mut().enumerate() {
                s.workload = KINDS[i % KINDS.len()].to_string();
                s.name = format!("{}-{i}", s.workload);
            }
            t
        }
    };
    Ok(t.select(|i, _| i < a.services))
}

fn control_of(c: &ControlArgs) -> anyhow::Result<(Vec<Strategy>, Slo)> {
    let s =
        Strategy::parse_list(&c.strategies).map_err(|e| anyhow::anyhow!("--strategies: {e}"))?;
    anyhow::ensure!(c.compress > 0.0, "--compress must be > 0");
    anyhow::ensure!(c.window_ms > 0.0, "--window-ms must be > 0");
    anyhow::ensure!(c.max_workers >= 1, "--max-workers must be >= 1");
    Ok((
        s,
        Slo {
            p90_ms: c.slo_ms,
            drops: true,
        },
    ))
}

fn replay_cmd(a: ReplayArgs) -> anyhow::Result<()> {
    let trace = replay_trace(&a)?;
    let (strategies, slo) = control_of(&a.ctl)?;
    let c = &a.ctl;
    let cfg = ReplayConfig {
        strategies,
        compress: c.compress,
        max_s: c.max_s,
        peak_workers: c.peak_workers,
        mem: a.mem.clone(),
        slo,
        scale_p90_ms: c.scale_p90_ms,
        max_queue: c.max_queue,
        window_ms: c.window_ms,
        cooldown_ms: c.cooldown_ms,
        max_workers: c.max_workers,
        seed: a.seed,
        ..ReplayConfig::default()
    };
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} {spinner} {msg}").expect("style"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    // Periodic status lines also when stderr is not a terminal (the bar is hidden then).
    let progress = |m: &str| {
        if bar.is_hidden() {
            eprintln!("[{:>6.1}s] {m}", bar.elapsed().as_secs_f64());
        } else {
            bar.println(m);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(replay::run(&trace, &cfg, &progress))?;
    bar.finish_and_clear();
    let md = report::write_replay(&a.out, &r)?;
    println!("{md}\nresults in {}", a.out.display());
    Ok(())
}

fn print_model(m: &CostModel) {
    println!("cost model from {}", m.source);
    for s in &m.strategies {
        let med = |v: &[f64]| gen::quantile(v, 0.5);
        println!(
            "  {:<13} ready p50 {:>8.1} ms  first answer p50 {:>8.1} ms  warm {:>4.2} -> {:>4.2}  footprint {:>6.1} -> {:>6.1} MiB  ({} samples)",
            s.strategy.name(),
            med(&s.ready_ms),
            med(&s.first_answer_ms),
            s.warm.first().copied().unwrap_or(0.0),
            s.warm.last().copied().unwrap_or(0.0),
            s.footprint.first().copied().unwrap_or(0.0) / (1 << 20) as f64,
            s.footprint.last().copied().unwrap_or(0.0) / (1 << 20) as f64,
            s.samples
        );
    }
    for w in &m.workloads {
        println!(
            "  workload {:<9} {:>6.0} req/s warm, service p50 {:.2} ms p90 {:.2} ms",
            w.workload, w.capacity_rps, w.service_ms, w.service_p90_ms
        );
    }
}

fn sim_config(a: &SimulateArgs, slo: Slo) -> SimConfig {
    let c = &a.ctl;
    SimConfig {
        compress: c.compress,
        max_s: c.max_s,
        peak_workers: c.peak_workers,
        slo,
        scale_p90_ms: c.scale_p90_ms,
        max_queue: c.max_queue,
        window_s: c.window_ms / 1e3,
        cooldown_s: c.cooldown_ms / 1e3,
        max_workers: c.max_workers,
        hosts: a.hosts,
        host_mem_bytes: (a.host_mem_gib * (1u64 << 30) as f64) as u64,
        host_cores: a.host_cores,
        seed: a.gen.seed,
    }
}

fn run_all(
    trace: &Trace,
    model: &CostModel,
    strategies: &[Strategy],
    cfg: &SimConfig,
) -> anyhow::Result<Vec<SimRun>> {
    let bar = ProgressBar::new(1000 * strategies.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {percent}% {msg}")
            .expect("style"),
    );
    let mut out = Vec::new();
    for (i, &s) in strategies.iter().enumerate() {
        bar.set_message(s.name());
        let base = 1000 * i as u64;
        let mut last = 0u64;
        let t0 = Instant::now();
        out.push(sim::simulate(trace, model, s, cfg, |f| {
            let p = (f * 1000.0) as u64;
            bar.set_position(base + p);
            if bar.is_hidden() && p / 250 > last / 250 {
                eprintln!(
                    "simulate {}: {}% ({:.1} s)",
                    s.name(),
                    p / 10,
                    t0.elapsed().as_secs_f64()
                );
            }
            last = p;
        })?);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<()> {
    let model = CostModel::load(&a.model)?;
    let (strategies, slo) = control_of(&a.ctl)?;
    let cfg = sim_config(&a, slo);
    let mut md = String::new();
    if let Some(v) = &a.validate {
        md.push_str(&validate(v, &model, &strategies, &a.out)?);
    }
    let trace = match &a.trace {
        Some(p) => Trace::load(p)?,
        None => gen::generate(&a.gen.params())?.0,
    };
    let t0 = Instant::now();
    let runs = run_all(&trace, &model, &strategies, &cfg)?;
    let took = t0.elapsed().as_secs_f64();
    let mut dc = Vec::new();
    for &slo_ms in &a.slo_sweep {
        for &s in &strategies {
            let c = SimConfig {
                slo: Slo {
                    p90_ms: slo_ms,
                    drops: true,
                },
                ..cfg.clone()
            };
            let r =
                sim::smallest_datacenter(&trace, &model, s, &c, a.overload_target, a.max_hosts)?;
            eprintln!(
                "SLO {slo_ms} ms, {}: {}",
                s.name(),
                r.as_ref()
                    .map_or("not met".to_string(), |(h, _)| format!("{h} hosts"))
            );
            dc.push((s.name().to_string(), slo_ms, r.map(|x| x.0)));
        }
    }
    let body = report::write_sim(&a.out, "sim", &runs, &dc)?;
    md.push_str(&format!(
        "\nsimulation: {} services x {:.0} s of trace ({:.0} s simulated per strategy), {} strategies in {:.1} s ({:.1} s per strategy)\n\n",
        trace.services.len(),
        trace.duration_s(),
        (trace.duration_s() / cfg.compress).min(cfg.max_s),
        strategies.len(),
        took,
        took / strategies.len().max(1) as f64
    ));
    md.push_str(&body);
    report::write(&a.out, "simulate.md", &md)?;
    println!("{md}\nresults in {}", a.out.display());
    Ok(())
}

/// Simulate a replay's own trace with its settings and compare totals.
fn validate(
    path: &std::path::Path,
    model: &CostModel,
    strategies: &[Strategy],
    out: &std::path::Path,
) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let r: ReplayReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a replay result", path.display()))?;
    let c = &r.config;
    let cfg = SimConfig {
        compress: c.compress,
        max_s: c.max_s,
        peak_workers: c.peak_workers,
        slo: c.slo,
        scale_p90_ms: c.scale_p90_ms,
        max_queue: c.max_queue,
        window_s: c.window_ms / 1e3,
        cooldown_s: c.cooldown_ms / 1e3,
        max_workers: c.max_workers,
        hosts: None,
        host_mem_bytes: 24 << 30,
        host_cores: r.host_cores,
        seed: c.seed,
    };
    let mut md = String::from("validation: the replay's trace and settings, simulated\n\n| strategy | overloads replay | overloads sim | memory GiB·s replay | sim | diff | vCPU·s replay | sim | diff |\n|---|---|---|---|---|---|---|---|---|\n");
    let mut sims = Vec::new();
    for run in &r.runs {
        if !strategies.contains(&run.strategy) {
            continue;
        }
        let real: Totals = totals(run.strategy.name(), &run.services);
        let s = sim::simulate(&r.trace, model, run.strategy, &cfg, |_| {})?;
        let d = |a: f64, b: f64| if a > 0.0 { (b / a - 1.0) * 100.0 } else { 0.0 };
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:+.0}% | {:.1} | {:.1} | {:+.0}% |\n",
            run.strategy.name(),
            real.overloads,
            s.totals.overloads,
            real.mem_gib_s,
            s.totals.mem_gib_s,
            d(real.mem_gib_s, s.totals.mem_gib_s),
            real.vcpu_s,
            s.totals.vcpu_s,
            d(real.vcpu_s, s.totals.vcpu_s),
        ));
        sims.push(s);
    }
    report::write(out, "validation.md", &md)?;
    report::write(out, "validation-sim.json", &serde_json::to_string(&sims)?)?;
    Ok(md)
}
