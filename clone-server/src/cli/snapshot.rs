//! `kscope snapshot save|restore`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use kscope_vmm::Vm;

use kscope_bench::runner;
use kscope_vmm::summary::{fmt_bytes, fmt_us};
use kscope_vmm::MemoryMode;

/// `kscope snapshot` subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Boot and warm a workload, save it to a directory while it runs (short pause).
    Save(SaveArgs),
    /// Restore a saved VM (lazily or eagerly) and check that it answers.
    Restore(RestoreArgs),
}

/// Arguments of `kscope snapshot save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Workload to boot and warm.
    #[arg(long, short)]
    pub workload: String,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Requests that warm the VM before saving.
    #[arg(long, default_value_t = 50)]
    pub warm: usize,
    /// Directory to write (created; must not hold a snapshot already).
    #[arg(long)]
    pub dir: PathBuf,
}

/// Arguments of `kscope snapshot restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Workload the snapshot runs (to generate and check requests).
    #[arg(long, short)]
    pub workload: String,
    /// Lazy (pages read from the memory file on first touch) or eager.
    #[arg(long, default_value_t = MemoryMode::Lazy, value_parser = super::memory_mode_arg())]
    pub memory: MemoryMode,
    /// Requests to send to the restored VM.
    #[arg(long, short = 'n', default_value_t = 20)]
    pub requests: usize,
}

/// Run `kscope snapshot ...`.
pub fn snapshot(c: SnapshotCmd) -> anyhow::Result<()> {
    match c {
        SnapshotCmd::Save(a) => {
            let w = runner::parse_workload(&a.workload)?;
            if a.dir.join("state.ksnap").exists() {
                anyhow::bail!(
                    "{} already holds a snapshot: choose another --dir or remove it",
                    a.dir.display()
                );
            }
            let b = runner::boot(w, a.mem, &format!("{}-snap", w.name()))?;
            runner::drive(&b.vm, w, &w.requests(1, a.warm), 4, true).context("warming")?;
            let r = b.vm.snapshot(&a.dir).context("saving the snapshot")?;
            println!(
                "saved {} ({} MiB) to {}: paused {}, written in {}, {} data pages ({})",
                w.name(),
                a.mem >> 20,
                r.dir.display(),
                fmt_us(r.pause.as_secs_f64() * 1e6),
                fmt_us(r.total.as_secs_f64() * 1e6),
                r.memory.data_pages,
                fmt_bytes(r.memory.data_pages * 4096)
            );
            b.vm.stop().context("stopping the VM")?;
        }
        SnapshotCmd::Restore(a) => {
            let w = runner::parse_workload(&a.workload)?;
            let t = Instant::now();
            let vm = Vm::restore(&a.dir, a.memory, &format!("{}-restored", w.name()))
                .with_context(|| format!("restoring {}", a.dir.display()))?;
            let restored = t.elapsed();
            let reqs = w.requests(3, a.requests + 1);
            runner::drive(&vm, w, &reqs[..1], 1, true).context("first request")?;
            let first = t.elapsed();
            let run = runner::drive(&vm, w, &reqs[1..], 4, true).context("driving")?;
            let m = vm.memory_stats();
            println!(
                "restored {} ({:?}) in {}; first response after {}; {} requests at {:.0} req/s, all checked; {} faults, footprint {}",
                a.dir.display(),
                a.memory,
                fmt_us(restored.as_secs_f64() * 1e6),
                fmt_us(first.as_secs_f64() * 1e6),
                run.requests,
                run.throughput_rps,
                m.faults,
                fmt_bytes(m.footprint_bytes)
            );
            vm.stop().context("stopping the VM")?;
        }
    }
    Ok(())
}
