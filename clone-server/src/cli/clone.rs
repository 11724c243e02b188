//! `kscope clone`: boot and warm a parent, clone it N times, drive every clone, report per
//! clone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kscope_vmm::pool::{ShellKey, ShellPool};
use kscope_vmm::{CloneOptions, MemoryMode, Vm};
use kscope_workloads::Workload;
use serde::Serialize;

use kscope_bench::runner::{self, DriveReport};
use kscope_vmm::summary::{fmt_bytes, fmt_us};

/// Arguments of `kscope clone`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// Workload: web, olap, json, aes, matmul, compress.
    #[arg(long, short)]
    pub workload: String,
    /// Guest memory of the parent (and each clone).
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Number of clones.
    #[arg(long, short = 'n', default_value_t = 4)]
    pub clones: usize,
    /// Memory mode of the clones.
    #[arg(long, default_value_t = MemoryMode::Lazy, value_parser = super::memory_mode_arg())]
    pub memory: MemoryMode,
    /// Requests that warm the parent before cloning.
    #[arg(long, default_value_t = 50)]
    pub warm: usize,
    /// Requests sent to each clone.
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// Pre-created VM shells ready for lazy clones before the call, as a running
    /// `kscope serve --pool N` keeps them (0: every clone makes its own VM, slower).
    #[arg(long, default_value_t = 8)]
    pub pool: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Per-clone results.
#[derive(Serialize)]
pub struct CloneResult {
    /// Clone id (as written into the clone's generation page).
    pub clone_id: u64,
    /// Call to the clone's first instruction.
    pub clone_latency_ms: f64,
    /// Clone's first instruction... to its first response (call to first response minus
    /// clone latency is included in `first_response_ms`).
    pub first_response_ms: f64,
    /// The requests after the first.
    pub run: DriveReport,
    /// Memory counters: faults, pages fetched, footprint.
    pub memory: kscope_vmm::MemoryStats,
}

/// What `kscope clone` reports.
#[derive(Serialize)]
pub struct CloneReport {
    /// Workload name.
    pub workload: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Memory mode.
    pub memory: MemoryMode,
    /// Parent boot to ready.
    pub parent_boot_ms: f64,
    /// Parent throughput while warm (the reference).
    pub parent_warm: DriveReport,
    /// How long the parent's vCPUs were out of the guest for the clone.
    pub parent_pause_ms: f64,
    /// Wall time of the clone call.
    pub clone_call_ms: f64,
    /// Clones that started from a pre-created VM shell (`--pool`).
    pub pooled: usize,
    /// Per clone.
    pub clones: Vec<CloneResult>,
}

/// Boot, warm, clone and drive: the engine of `kscope clone` and the demo.
pub fn clone_workload(
    w: Workload,
    mem: u64,
    n: usize,
    memory: MemoryMode,
    warm: usize,
    requests: usize,
    pool: usize,
) -> anyhow::Result<CloneReport> {
    let parent = runner::boot(w, mem, &format!("{}-parent", w.name()))?;
    let parent_warm = runner::drive(&parent.vm, w, &w.requests(1, warm), 4, true)
        .context("warming the parent")?;
    // As `kscope serve` does after a boot: the standby VM of the first freeze, made ahead.
    parent
        .vm
        .prepare_freeze()
        .context("making the parent's standby VM")?;
    // As a running service has them: pre-created VM shells for lazy clones of this size, the
    // pool full (its refill thread idle, as it is in a service that has been up a while).
    let shells = match (pool, memory) {
        (0, _) | (_, MemoryMode::Eager) => None,
        (cap, MemoryMode::Lazy) => {
            let p = Arc::new(ShellPool::new(cap).context("starting the VM pool")?);
            let key = ShellKey {
                mem_bytes: parent.vm.mem_bytes(),
                vcpus: parent.vm.config().vcpus,
            };
            p.prepare(key);
            p.wait_ready(key, cap, Duration::from_secs(30));
            Some(p)
        }
    };
    let t = Instant::now();
    let batch = parent
        .vm
        .clone_children(
            n,
            &CloneOptions {
                memory,
                // A clone: the pool (and its leftover shells' teardown) outlives the call.
                pool: shells.clone(),
                ..CloneOptions::default()
            },
        )
        .context("cloning the parent")?;
    let clone_call = t.elapsed();
    // Every clone answers its own stream; clones run concurrently, one driver thread each.
    let results: Vec<anyhow::Result<CloneResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .children
            .iter()
            .zip(&batch.clone_latency)
            .enumerate()
            .map(|(i, (child, lat))| {
                s.spawn(move || drive_clone(child, w, i as u64 + 2, requests, t, *lat))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked")))
            })
            .collect()
    });
    let clones = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    for c in &batch.children {
        c.stop().context("stopping a clone")?;
    }
    parent.vm.stop().context("stopping the parent")?;
    Ok(CloneReport {
        workload: w.name().into(),
        mem_mib: mem >> 20,
        memory,
        parent_boot_ms: parent.boot.as_secs_f64() * 1e3,
        parent_warm,
        parent_pause_ms: batch.parent_pause.as_secs_f64() * 1e3,
        clone_call_ms: clone_call.as_secs_f64() * 1e3,
        pooled: batch.breakdown.iter().filter(|b| b.pooled).count(),
        clones,
    })
}

fn drive_clone(
    child: &Vm,
    w: Workload,
    seed: u64,
    n: usize,
    called: Instant,
    latency: std::time::Duration,
) -> anyhow::Result<CloneResult> {
    let reqs = w.requests(seed, n + 1);
    runner::drive(child, w, &reqs[..1], 1, true)
        .with_context(|| format!("first request to clone {}", child.name()))?;
    let first = called.elapsed();
    let run = runner::drive(child, w, &reqs[1..], 4, true)
        .with_context(|| format!("driving clone {}", child.name()))?;
    Ok(CloneResult {
        clone_id: child.clone_id().unwrap_or(0),
        clone_latency_ms: latency.as_secs_f64() * 1e3,
        first_response_ms: first.as_secs_f64() * 1e3,
        run,
        memory: child.memory_stats(),
    })
}

/// Run `kscope clone`.
pub fn clone(a: CloneArgs) -> anyhow::Result<()> {
    let w = runner::parse_workload(&a.workload)?;
    let r = clone_workload(w, a.mem, a.clones, a.memory, a.warm, a.requests, a.pool)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(())
}

/// Print a clone report as a table.
pub fn print_report(r: &CloneReport) {
    println!(
        "parent: {} in {} MiB, booted in {}, warm at {:.0} req/s (p50 {})",
        r.workload,
        r.mem_mib,
        fmt_us(r.parent_boot_ms * 1e3),
        r.parent_warm.throughput_rps,
        fmt_us(r.parent_warm.latency.p50_us)
    );
    println!(
        "clone call: {} for {} {:?} clones ({} from the pool of pre-created VMs); parent paused {}",
        fmt_us(r.clone_call_ms * 1e3),
        r.clones.len(),
        r.memory,
        r.pooled,
        fmt_us(r.parent_pause_ms * 1e3)
    );
    println!(
        "\n{:>5} {:>13} {:>15} {:>8} {:>8} {:>9} {:>10} {:>11}",
        "clone",
        "clone lat.",
        "1st response",
        "req/s",
        "faults",
        "fetched",
        "zero-fill",
        "footprint"
    );
    for c in &r.clones {
        println!(
            "{:>5} {:>13} {:>15} {:>8.0} {:>8} {:>9} {:>10} {:>11}",
            c.clone_id,
            fmt_us(c.clone_latency_ms * 1e3),
            fmt_us(c.first_response_ms * 1e3),
            c.run.throughput_rps,
            c.memory.faults,
            c.memory.pages_fetched + c.memory.pages_prefetched,
            c.memory.zero_filled,
            fmt_bytes(c.memory.footprint_bytes)
        );
    }
}
