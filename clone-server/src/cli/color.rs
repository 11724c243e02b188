//! `kscope color`: boot and warm a workload, color its memory from the outside, compare with
//! the guest's ground truth.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kscope_colorer::{accuracy, Color};
use serde::Serialize;

use kscope_bench::runner;
use kscope_vmm::summary::{fmt_bytes, fmt_us};

/// Arguments of `kscope color`.
#[derive(Args, Debug)]
pub struct ColorArgs {
    /// Workload: web, olap, json, aes, matmul, compress.
    #[arg(long, short)]
    pub workload: String,
    /// Guest memory (e.g. 64M, 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = super::mem_arg)]
    pub mem: u64,
    /// Requests to warm the workload with before coloring.
    #[arg(long, default_value_t = 100)]
    pub warm: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `kscope color` reports.
#[derive(Serialize)]
pub struct ColorReport {
    /// Workload name.
    pub workload: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Time to copy guest memory out of the paused VM (not part of coloring).
    pub copy_ms: f64,
    /// Time to color (the colorer's whole pass).
    pub color_ms: f64,
    /// Color statistics (counts, walks, phase timings).
    pub stats: kscope_colorer::ColorStats,
    /// Accuracy against the guest's ground truth (read only for this measurement).
    pub accuracy: accuracy::AccuracyReport,
}

/// Boot, warm, pause, color and measure `w`.
pub fn color_workload(a: &ColorArgs) -> anyhow::Result<ColorReport> {
    let w = runner::parse_workload(&a.workload)?;
    let b = runner::boot(w, a.mem, &format!("{}-color", w.name()))?;
    let reqs = w.requests(7, a.warm);
    runner::drive(&b.vm, w, &reqs, 4, true).context("warming the workload")?;
    b.vm.pause().context("pausing the VM")?;
    let t = Instant::now();
    let mut mem = vec![0u8; b.vm.mem_bytes() as usize];
    b.vm.read_phys(0, &mut mem)
        .context("reading guest memory")?;
    let copy_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let map = kscope_colorer::color_kscope(&mem, None).context("coloring guest memory")?;
    let color_ms = t.elapsed().as_secs_f64() * 1e3;
    let acc = accuracy::measure(&mem, &map).context("reading the ground truth")?;
    b.vm.stop().context("stopping the VM")?;
    Ok(ColorReport {
        workload: w.name().into(),
        mem_mib: a.mem >> 20,
        copy_ms,
        color_ms,
        stats: map.stats.clone(),
        accuracy: acc,
    })
}

/// Run `kscope color`.
pub fn color(a: ColorArgs) -> anyhow::Result<()> {
    let r = color_workload(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} in {} MiB: {} frames colored in {} ({} processes, {} cached file pages)",
        r.workload,
        r.mem_mib,
        r.stats.frames,
        fmt_us(r.color_ms * 1e3),
        r.stats.processes.len(),
        r.stats.cached_pages
    );
    println!(
        "\n{:<16} {:>9} {:>11} {:>7}   {:>9} {:>7}",
        "color", "frames", "size", "share", "precision", "recall"
    );
    for c in Color::ALL {
        let n = r.stats.counts.get(&c).copied().unwrap_or(0);
        let score = r.accuracy.scores.iter().find(|s| s.color == c);
        if n == 0 && score.is_none() {
            continue;
        }
        let (p, rc) = score
            .map(|s| (format!("{:.3}", s.precision), format!("{:.3}", s.recall)))
            .unwrap_or_default();
        println!(
            "{:<16} {:>9} {:>11} {:>6.1}%   {:>9} {:>7}",
            c.name(),
            n,
            fmt_bytes(n * 4096),
            100.0 * n as f64 / r.stats.frames.max(1) as f64,
            p,
            rc
        );
    }
    println!(
        "\naccuracy vs ground truth: {:.2}% (zero pages as correct: {:.2}%)",
        100.0 * r.accuracy.accuracy,
        100.0 * r.accuracy.accuracy_zero_ok
    );
    let t = &r.stats.timings;
    println!(
        "time: walk {} + page cache {} + allocator {} + zero scan {} = {} (copy out of the VM: {})",
        fmt_us(t.walk_us as f64),
        fmt_us(t.cache_us as f64),
        fmt_us(t.allocator_us as f64),
        fmt_us(t.zero_us as f64),
        fmt_us(t.total_us as f64),
        fmt_us(r.copy_ms * 1e3)
    );
    Ok(())
}
