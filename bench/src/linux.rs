//! `kscope bench linux`: the Linux profile on real Linux memory images (ELF cores made by
//! `colorer/linux/make-image.sh`).
//!
//! - **Coloring time.** Each image is colored `reps` times: profile derivation (VMCOREINFO,
//!   BTF, every `struct page`) and the coloring pass, timed separately. Baseline measured in
//!   the same run on the same image: one pass that reads every frame to test it for zero
//!   (the cheapest content pass any colorer with zero detection makes) and one that hashes
//!   every frame (what brute-force dedup pays before finding anything).
//! - **Color-targeted dedup** across the images (Kaleidoscope): candidates are the non-zero
//!   frames of all images; brute force hashes all of them, the targeted scan only the colors
//!   likely shared ([`crate::dedup::TARGET_COLORS`]: kernel code, user code, page cache of
//!   executables and of data files). Effort = frames hashed; savings = duplicate frames found.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use kscope_colorer::linux::LinuxImage;
use kscope_colorer::mem::{is_zero, PhysMem};
use kscope_colorer::Color;
use serde::Serialize;

use crate::dedup::{duplicates_by_color, scan, Frame, ScanResult, TARGET_COLORS};

/// Min, median and max of a series, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        min: v.first().copied().unwrap_or(0.0),
        median: v.get(v.len() / 2).copied().unwrap_or(0.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

/// Timing of one image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageTiming {
    /// Image path.
    pub image: String,
    /// Kernel release.
    pub kernel: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Repetitions.
    pub reps: usize,
    /// Profile derivation.
    pub profile_ms: Spread,
    /// Coloring pass.
    pub color_ms: Spread,
    /// Profile + coloring.
    pub total_ms: Spread,
    /// Baseline: zero test of every frame.
    pub zero_scan_ms: Spread,
    /// Baseline: hash every frame.
    pub hash_all_ms: Spread,
}

/// Result of `kscope bench linux`.
#[derive(Clone, Debug, Serialize)]
pub struct LinuxBenchReport {
    /// Per image.
    pub timings: Vec<ImageTiming>,
    /// Candidate frames (non-zero, all images).
    pub candidates: u64,
    /// Brute force.
    pub brute: ScanResult,
    /// Targeted colors.
    pub targeted: ScanResult,
    /// Colors of the targeted scan.
    pub target_colors: Vec<String>,
    /// Brute-force duplicates by color: (color, frames, duplicates).
    pub by_color: Vec<(String, u64, u64)>,
}

/// Run the benchmark on `images` (at least one; dedup needs two or more).
pub fn run(images: &[PathBuf], reps: usize) -> anyhow::Result<LinuxBenchReport> {
    let mut timings = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    for (vm, path) in images.iter().enumerate() {
        let mut img = LinuxImage::open(path)
            .with_context(|| format!("opening {} with the Linux profile", path.display()))?;
        let (mut prof, mut col, mut tot, mut zs, mut ha) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut map = None;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            img = LinuxImage::from_core(img.core)?;
            let p = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let m = img.color()?;
            let c = t.elapsed().as_secs_f64() * 1e3;
            prof.push(p);
            col.push(c);
            tot.push(p + c);
            map = Some(m);
            let n = img.core.size() / 4096;
            let t = Instant::now();
            let zeros = (0..n)
                .filter(|&g| img.core.page(g).is_some_and(is_zero))
                .count();
            zs.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(zeros);
            let t = Instant::now();
            let mut acc = 0u64;
            for g in 0..n {
                if let Some(p) = img.core.page(g) {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    p.hash(&mut h);
                    acc ^= h.finish();
                }
            }
            std::hint::black_box(acc);
            ha.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let map = map.context("no coloring ran")?;
        timings.push(ImageTiming {
            image: path.display().to_string(),
            kernel: img.profile.layout.release.clone(),
            mem_mib: img.core.size() >> 20,
            reps: reps.max(1),
            profile_ms: spread(prof),
            color_ms: spread(col),
            total_ms: spread(tot),
            zero_scan_ms: spread(zs),
            hash_all_ms: spread(ha),
        });
        for g in 0..img.core.size() / 4096 {
            let Some(p) = img.core.page(g) else { continue };
            if is_zero(p) {
                continue;
            }
            let mut data = Box::new([0u8; 4096]);
            data.copy_from_slice(p);
            frames.push(Frame {
                vm,
                gfn: g,
                color: map.color(g),
                data,
            });
        }
    }
    let brute = scan(&frames, |_| true);
    let targeted = scan(&frames, |f| TARGET_COLORS.contains(&f.color));
    Ok(LinuxBenchReport {
        timings,
        candidates: frames.len() as u64,
        brute,
        targeted,
        target_colors: TARGET_COLORS
            .iter()
            .map(|c: &Color| c.name().to_string())
            .collect(),
        by_color: duplicates_by_color(&frames),
    })
}

/// The report as text.
pub fn render(r: &LinuxBenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let sp = |x: &Spread| format!("{:.1} [{:.1}, {:.1}]", x.median, x.min, x.max);
    let _ = writeln!(s, "coloring time, ms: median [min, max]");
    for t in &r.timings {
        let _ = writeln!(
            s,
            "{} ({}, {} MiB, {} reps):\n  profile {}  color {}  total {}\n  baselines: zero test of every frame {}, hash every frame {}; total / zero test = {:.2}x",
            t.image,
            t.kernel,
            t.mem_mib,
            t.reps,
            sp(&t.profile_ms),
            sp(&t.color_ms),
            sp(&t.total_ms),
            sp(&t.zero_scan_ms),
            sp(&t.hash_all_ms),
            t.total_ms.median / t.zero_scan_ms.median.max(1e-9)
        );
    }
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    let _ = writeln!(
        s,
        "\ndedup across {} images: {} candidate frames (non-zero)",
        r.timings.len(),
        r.candidates
    );
    let _ = writeln!(
        s,
        "brute force: {} hashed, {} duplicates; targeted ({}): {} hashed, {} duplicates",
        r.brute.hashed,
        r.brute.duplicates,
        r.target_colors.join(", "),
        r.targeted.hashed,
        r.targeted.duplicates
    );
    let _ = writeln!(
        s,
        "targeted: {:.1}% of the effort finds {:.1}% of the savings (Kaleidoscope on Linux: 10% finds 53%)",
        pct(r.targeted.hashed, r.brute.hashed),
        pct(r.targeted.duplicates, r.brute.duplicates)
    );
    let _ = writeln!(
        s,
        "per color (frames = share of the effort, duplicates = share of the savings):"
    );
    for (c, n, d) in &r.by_color {
        let _ = writeln!(
            s,
            "  {c:<16} {n:>8} ({:>5.1}%) {d:>8} ({:>5.1}%)",
            pct(*n, r.brute.hashed),
            pct(*d, r.brute.duplicates)
        );
    }
    s
}
