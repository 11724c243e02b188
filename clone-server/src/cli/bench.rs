//! `kscope bench ...`: the benchmarks of [`kscope_bench`], printed as tables (or JSON).

use anyhow::Context;
use clap::{Args, Subcommand};
use kscope_bench::{dedup, linux, plot, warmup};
use kscope_policies::PolicySpec;

use kscope_bench::runner;

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Clone a warm parent per prefetch policy and measure how fast each clone gets warm.
    Warmup(WarmupArgs),
    /// Color-targeted deduplication across parents and clones vs hashing every frame.
    Dedup(DedupArgs),
    /// The web workload over TCP (wrk in kscope's network namespace) beside the request
    /// device; clone call to first TCP answer at the clone's address; N clones under wrk.
    Net(super::bench_net::NetArgs),
    /// The guest kernel's costs in both CPU modes (emulated vs PVM-native), same run.
    Modes(ModesArgs),
    /// Linux memory images (colorer/linux/make-image.sh): coloring time, and color-targeted
    /// dedup across the images.
    Linux(LinuxArgs),
    /// Cloning figures of issue 11 per guest size (parent pause, call -> first instruction,
    /// n clones -> all running, first-second throughput vs the warm parent), against goals.
    Clone(CloneArgs),
}

/// Arguments of `kscope bench clone`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// Guest sizes, comma-separated (a size whose parent cannot boot is skipped).
    #[arg(long, default_value = "64M,256M,1G,4G", value_delimiter = ',', value_parser = super::mem_arg)]
    pub sizes: Vec<u64>,
    /// Repetitions per size (medians with min-max are printed).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Children of the batch clone (one call).
    #[arg(long, default_value_t = 64)]
    pub clones: usize,
    /// Requests that warm the parent, and that it serves again before the later clone.
    #[arg(long, default_value_t = 50)]
    pub warm_requests: usize,
    /// Throughput window in milliseconds (parent and first clone).
    #[arg(long, default_value_t = 1000)]
    pub window_ms: u64,
    /// Shells in the pool of pre-created VMs for the pooled measurements (same run, later
    /// clones of the same parent, without then with the pool); default: the batch size. Each
    /// shell holds 4 descriptors and kernel memory (printed as "host memory per shell"); 0
    /// skips the pooled measurements.
    #[arg(long)]
    pub pool: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kscope bench linux`.
#[derive(Args, Debug)]
pub struct LinuxArgs {
    /// ELF memory images of Linux guests (give two or more for dedup).
    #[arg(long = "image", required = true)]
    pub images: Vec<std::path::PathBuf>,
    /// Repetitions of each coloring.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kscope bench modes`.
#[derive(Args, Debug)]
pub struct ModesArgs {
    /// Repetitions per mode (medians with min-max are printed).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// `web` requests per throughput run.
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Guest memory of the web VMs.
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kscope bench warmup`.
#[derive(Args, Debug)]
pub struct WarmupArgs {
    /// Workload: web, olap, json, aes, matmul, compress.
    #[arg(long, short)]
    pub workload: String,
    /// Policies, comma-separated (lazy, upfront, blind, kaleidoscope, reap, faasnap, activeset,
    /// learned, each optionally `name:items`); `lazy` is always measured as the reference.
    #[arg(
        long,
        short,
        default_value = "lazy,upfront,blind,kaleidoscope,reap,faasnap,activeset,learned"
    )]
    pub policy: String,
    /// Rounds: each runs a warm reference clone (all memory installed before it starts) and
    /// one clone per policy; medians over the rounds are reported.
    #[arg(long, default_value_t = 1)]
    pub clones: usize,
    /// Requests per measured stream (K).
    #[arg(long, short = 'k', default_value_t = 60)]
    pub requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Record the working set with one input and run with another (FaaSnap's case).
    #[arg(long)]
    pub ws_change: bool,
    /// Fraction of the warm parent's throughput that counts as warm for the threshold time
    /// (the reported time to warm is the time lost against the warm reference).
    #[arg(long, default_value_t = 0.9)]
    pub warm_fraction: f64,
    /// Each clone's fault handler polls this long (microseconds) for the next fault before
    /// it sleeps (default: the clones' default, `kscope_vmm::clone::FAULT_SPIN`).
    #[arg(long, default_value_t = kscope_vmm::clone::FAULT_SPIN.as_micros() as u64)]
    pub fault_spin_us: u64,
    /// Write the throughput-over-time plot (SVG) here.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kscope bench dedup`.
#[derive(Args, Debug)]
pub struct DedupArgs {
    /// Workload.
    #[arg(long, short)]
    pub workload: String,
    /// Parents booted from the same image.
    #[arg(long, default_value_t = 2)]
    pub parents: usize,
    /// Lazy clones per parent.
    #[arg(long, default_value_t = 2)]
    pub clones: usize,
    /// Requests per VM.
    #[arg(long, short = 'k', default_value_t = 30)]
    pub requests: usize,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Also merge for real with Linux KSM (needs /sys/kernel/mm/ksm; takes control of ksmd
    /// for the run and restores its settings).
    #[arg(long)]
    pub ksm: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The warm-up plot of a report.
pub fn warmup_svg(r: &warmup::WarmupReport) -> anyhow::Result<String> {
    let series: Vec<plot::Series> = r
        .policies
        .iter()
        .map(|p| plot::Series {
            label: p.policy.clone(),
            points: p.curve.clone(),
        })
        .collect();
    Ok(plot::line_chart_svg(
        &format!(
            "{} clone warm-up{}",
            r.workload,
            if r.ws_change {
                " (working-set change)"
            } else {
                ""
            }
        ),
        "seconds since clone",
        &format!("requests/s (window of {})", r.rate_window),
        &series,
        Some(("warm parent", r.parent_rps)),
    )?)
}

/// Run `kscope bench ...`.
pub fn bench(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Net(a) => super::bench_net::net(a)?,
        BenchCmd::Warmup(a) => {
            let policies = a
                .policy
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<PolicySpec>())
                .collect::<Result<Vec<_>, _>>()?;
            let cfg = warmup::WarmupConfig {
                workload: runner::parse_workload(&a.workload)?,
                policies,
                clones: a.clones,
                requests: a.requests,
                window: a.window,
                mem_bytes: a.mem,
                ws_change: a.ws_change,
                warm_fraction: a.warm_fraction,
                fault_spin: std::time::Duration::from_micros(a.fault_spin_us),
            };
            let r = warmup::run(&cfg)?;
            if let Some(path) = &a.svg {
                std::fs::write(path, warmup_svg(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", warmup::render(&r));
            }
        }
        BenchCmd::Dedup(a) => {
            let cfg = dedup::DedupConfig {
                workload: runner::parse_workload(&a.workload)?,
                parents: a.parents,
                clones: a.clones,
                requests: a.requests,
                mem_bytes: a.mem,
                ksm: a.ksm,
            };
            let r = dedup::run(&cfg)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", dedup::render(&r));
            }
        }
        BenchCmd::Linux(a) => {
            let r = linux::run(&a.images, a.reps)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", linux::render(&r));
            }
        }
        BenchCmd::Clone(a) => {
            let cfg = kscope_bench::clone::CloneBenchConfig {
                sizes: a.sizes,
                reps: a.reps,
                batch: a.clones.max(1),
                warm_requests: a.warm_requests,
                window: std::time::Duration::from_millis(a.window_ms.max(1)),
                pool: a.pool.unwrap_or(a.clones.max(1)),
            };
            let r = kscope_bench::clone::run(&cfg)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", kscope_bench::clone::render(&r));
            }
        }
        BenchCmd::Modes(a) => {
            let r = kscope_bench::modes::run(&kscope_bench::modes::ModesOptions {
                reps: a.reps,
                web_requests: a.requests,
                mem_bytes: a.mem,
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                kscope_bench::modes::print(&r);
            }
        }
    }
    Ok(())
}
