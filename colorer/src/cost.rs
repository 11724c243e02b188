//! Cost measurement: how long coloring takes for a memory of a given size.
//!
//! [`measure`] times repeated passes over any [`PhysMem`] holding a kscope guest (the lead runs
//! it on real guests); [`measure_synthetic`] builds a [`crate::synth::SynthSpec::scaled`] guest
//! of the requested size first. `cargo run -p kscope-colorer --release --example color_cost --
//! 256 1024 2048` prints one JSON line per size.

use crate::color::{color, ColorError, ColorOptions, ColorStats};
use crate::kscope::KscopeProfile;
use crate::mem::PhysMem;
use crate::synth::{build, SynthError, SynthSpec};
use serde::Serialize;
use std::time::Instant;

/// Errors of cost measurement.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// Coloring failed.
    #[error(transparent)]
    Color(#[from] ColorError),
    /// The synthetic guest could not be built.
    #[error(transparent)]
    Synth(#[from] SynthError),
}

/// Timing of repeated coloring passes.
#[derive(Clone, Debug, Serialize)]
pub struct CostReport {
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Passes timed.
    pub runs: usize,
    /// Fastest pass, milliseconds.
    pub min_ms: f64,
    /// Median pass, milliseconds.
    pub median_ms: f64,
    /// Guest RAM colored per second at the median, MiB/s.
    pub mib_per_s: f64,
    /// Milliseconds to build the synthetic image (0 for real memory).
    pub build_ms: f64,
    /// Statistics (with phase timings) of the last pass.
    pub stats: ColorStats,
}

/// Color the kscope guest in `mem` `runs` times (at least once) and report the times.
pub fn measure<M: PhysMem + ?Sized>(
    mem: &M,
    extra_roots: &[u64],
    runs: usize,
) -> Result<CostReport, CostError> {
    let opts = ColorOptions {
        extra_roots: extra_roots.to_vec(),
        scan_zero: true,
    };
    let mut times = Vec::new();
    let mut stats = ColorStats::default();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let profile = KscopeProfile::open(mem).map_err(ColorError::from)?;
        let map = color(mem, &profile, &opts)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        stats = map.stats;
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    Ok(CostReport {
        mem_bytes: mem.size(),
        runs: times.len(),
        min_ms: times[0],
        median_ms,
        mib_per_s: (mem.size() as f64 / (1 << 20) as f64) / (median_ms / 1e3),
        build_ms: 0.0,
        stats,
    })
}

/// Build a synthetic guest of `mem_bytes` and [`measure`] it.
pub fn measure_synthetic(mem_bytes: u64, runs: usize) -> Result<CostReport, CostError> {
    let t = Instant::now();
    let g = build(&SynthSpec::scaled(mem_bytes))?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut r = measure(&g.mem, &[], runs)?;
    r.build_ms = build_ms;
    Ok(r)
}
