//! `kscope color`: boot and warm a workload, color its memory from the outside, compare with
//! the guest's ground truth; or color a memory image (`--image`): a Linux ELF core with
//! VMCOREINFO (Linux profile, ground truth from `--truth`), or kscope guest memory (a raw
//! memory file such as a snapshot's `memory.kmem`, or an ELF core without VMCOREINFO).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kscope_colorer::linux::truth::{self as ltruth, Truth};
use kscope_colorer::linux::{ElfCore, LinuxImage};
use kscope_colorer::{accuracy, Color, ColorMap, ColorStats};
use serde::Serialize;

use kscope_bench::runner;
use kscope_vmm::summary::{fmt_bytes, fmt_us};

/// Arguments of `kscope color`.
#[derive(Args, Debug)]
pub struct ColorArgs {
    /// Workload: web, olap, json, aes, matmul, compress.
    #[arg(
        long,
        short,
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub workload: Option<String>,
    /// Color this memory image instead of booting a workload: an ELF core file (qemu
    /// `dump-guest-memory`, kdump) or a raw memory file of a kscope guest.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Guest profile for --image: linux (ELF with VMCOREINFO), kscope, or auto.
    #[arg(long, value_enum, default_value_t = ProfileArg::Auto, requires = "image")]
    pub profile: ProfileArg,
    /// Ground truth of a Linux image (truth.bin from colorer/linux/make-image.sh).
    #[arg(long, requires = "image")]
    pub truth: Option<PathBuf>,
    /// VMCOREINFO text for a raw (non-ELF) Linux memory image, e.g. a kscope snapshot's
    /// memory file: the guest's note (/sys/kernel/vmcoreinfo) as KEY=VALUE lines.
    #[arg(long, requires = "image")]
    pub vmcoreinfo: Option<PathBuf>,
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

/// Guest profile of `kscope color --image`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    /// Linux, from the image's VMCOREINFO and BTF.
    Linux,
    /// kscope's own guest kernel (KInfo descriptor).
    Kscope,
    /// Linux if the image is an ELF core with VMCOREINFO, else kscope.
    Auto,
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
    let w = runner::parse_workload(a.workload.as_deref().unwrap_or_default())?;
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

/// What `kscope color --image` reports.
#[derive(Serialize)]
pub struct ImageReport {
    /// The image.
    pub image: String,
    /// Profile used.
    pub profile: String,
    /// Kernel release (Linux) or descriptor version (kscope).
    pub kernel: String,
    /// Time to read the image file (not part of coloring).
    pub read_ms: f64,
    /// Time to derive the profile (VMCOREINFO, BTF, frame descriptors).
    pub profile_ms: f64,
    /// Time of the coloring pass.
    pub color_ms: f64,
    /// Color statistics.
    pub stats: ColorStats,
    /// Accuracy against the ground truth, if there is one.
    pub accuracy: Option<accuracy::AccuracyReport>,
    /// Linux truth: frames free per kpageflags vs the kernel's nr_free_pages.
    pub truth_free: Option<(u64, Option<u64>)>,
    /// Linux truth: walked page tables by level and kernel flag.
    pub tables: Option<ltruth::TableBreakdown>,
}

/// Color a memory image.
pub fn color_image(
    path: &Path,
    profile: ProfileArg,
    truth: Option<&Path>,
    vmcoreinfo: Option<&Path>,
) -> anyhow::Result<ImageReport> {
    let t = Instant::now();
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let is_elf = bytes.starts_with(b"\x7fELF");
    if let (false, Some(vi)) = (is_elf, vmcoreinfo) {
        // Raw memory of a Linux guest with its VMCOREINFO given apart.
        let read_ms = t.elapsed().as_secs_f64() * 1e3;
        let text =
            std::fs::read_to_string(vi).with_context(|| format!("reading {}", vi.display()))?;
        let t = Instant::now();
        let (p, map) = kscope_colorer::linux::color_raw(&bytes, &text)
            .with_context(|| format!("coloring {} with the Linux profile", path.display()))?;
        let color_ms = t.elapsed().as_secs_f64() * 1e3;
        let (acc, free) = match truth {
            Some(tp) => {
                let a = ltruth::compare(&Truth::open(tp)?, &map)?;
                (Some(a.report), Some((a.truth_free_frames, a.nr_free_pages)))
            }
            None => (None, None),
        };
        return Ok(ImageReport {
            image: path.display().to_string(),
            profile: "linux (raw memory + VMCOREINFO)".into(),
            kernel: p.layout.release.clone(),
            read_ms,
            profile_ms: 0.0,
            color_ms,
            stats: map.stats,
            accuracy: acc,
            truth_free: free,
            tables: None,
        });
    }
    let (core, raw) = if is_elf || profile == ProfileArg::Linux {
        let c = ElfCore::parse(bytes).with_context(|| format!("reading {}", path.display()))?;
        (Some(c), Vec::new())
    } else {
        (None, bytes)
    };
    let read_ms = t.elapsed().as_secs_f64() * 1e3;
    let linux = match profile {
        ProfileArg::Linux => true,
        ProfileArg::Kscope => false,
        ProfileArg::Auto => core.as_ref().is_some_and(|c| c.vmcoreinfo().is_some()),
    };
    let image = path.display().to_string();
    if linux {
        let core = core.context("the Linux profile needs an ELF core file")?;
        let t = Instant::now();
        let img = LinuxImage::from_core(core)
            .with_context(|| format!("opening {image} with the Linux profile"))?;
        let profile_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let map = img.color().context("coloring the image")?;
        let color_ms = t.elapsed().as_secs_f64() * 1e3;
        let (acc, free, tables) = match truth {
            Some(tp) => {
                let tr = Truth::open(tp)?;
                let a = ltruth::compare(&tr, &map)?;
                let tables = ltruth::table_breakdown(&tr, &img.table_levels());
                (
                    Some(a.report),
                    Some((a.truth_free_frames, a.nr_free_pages)),
                    Some(tables),
                )
            }
            None => (None, None, None),
        };
        return Ok(ImageReport {
            image,
            profile: "linux".into(),
            kernel: img.profile.layout.release.clone(),
            read_ms,
            profile_ms,
            color_ms,
            stats: map.stats,
            accuracy: acc,
            truth_free: free,
            tables,
        });
    }
    if truth.is_some() {
        bail!("--truth is for Linux images; a kscope guest carries its ground truth in its memory");
    }
    let t = Instant::now();
    let (map, acc): (ColorMap, _) = match &core {
        Some(c) => {
            let map = kscope_colorer::color_kscope(c, c.vcpu_cr3s().first().copied())
                .context("coloring the image with the kscope profile")?;
            let acc = accuracy::measure(c, &map).ok();
            (map, acc)
        }
        None => {
            let map = kscope_colorer::color_kscope(&raw, None)
                .context("coloring the image with the kscope profile")?;
            let acc = accuracy::measure(&raw, &map).ok();
            (map, acc)
        }
    };
    let color_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(ImageReport {
        image,
        profile: "kscope".into(),
        kernel: "kscope guest".into(),
        read_ms,
        profile_ms: 0.0,
        color_ms,
        stats: map.stats,
        accuracy: acc,
        truth_free: None,
        tables: None,
    })
}

fn print_histogram(stats: &ColorStats, acc: Option<&accuracy::AccuracyReport>) {
    println!(
        "\n{:<16} {:>9} {:>11} {:>7}   {:>9} {:>7}",
        "color", "frames", "size", "share", "precision", "recall"
    );
    for c in Color::ALL {
        let n = stats.counts.get(&c).copied().unwrap_or(0);
        let score = acc.and_then(|a| a.scores.iter().find(|s| s.color == c));
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
            100.0 * n as f64 / stats.frames.max(1) as f64,
            p,
            rc
        );
    }
    if let Some(a) = acc {
        println!(
            "\naccuracy vs ground truth: {:.2}% (zero pages as correct: {:.2}%)",
            100.0 * a.accuracy,
            100.0 * a.accuracy_zero_ok
        );
    }
}

fn print_matrix(a: &accuracy::AccuracyReport) {
    let cols: Vec<Color> = Color::ALL
        .into_iter()
        .filter(|c| a.matrix.values().any(|r| r.contains_key(c)))
        .collect();
    print!("\nconfusion (rows: truth, columns: color)\n{:<18}", "");
    for c in &cols {
        print!(" {:>9}", &c.name()[..c.name().len().min(9)]);
    }
    println!();
    for (row, counts) in &a.matrix {
        print!("{row:<18}");
        for c in &cols {
            print!(" {:>9}", counts.get(c).copied().unwrap_or(0));
        }
        println!();
    }
}

fn print_image(r: &ImageReport) {
    println!(
        "{} ({}, {}): {} frames colored in {} (profile {}, read {}); {} process roots, {} cached file pages in {} files",
        r.image,
        r.profile,
        r.kernel,
        r.stats.frames,
        fmt_us(r.color_ms * 1e3),
        fmt_us(r.profile_ms * 1e3),
        fmt_us(r.read_ms * 1e3),
        r.stats.processes.len(),
        r.stats.cached_pages,
        r.stats.files
    );
    print_histogram(&r.stats, r.accuracy.as_ref());
    if let Some(a) = &r.accuracy {
        print_matrix(a);
    }
    if let Some((truth, kernel)) = r.truth_free {
        let k = kernel.map_or("unknown".to_string(), |k| k.to_string());
        println!("\nfree frames per kpageflags: {truth}, per the kernel (nr_free_pages): {k}");
    }
    if let Some(t) = &r.tables {
        let parts: Vec<String> = t.by_level.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "walked page tables: {}; process PTE/PMD pages the kernel flags too: {:.1}%",
            parts.join(", "),
            100.0 * t.flagged_levels_agreement
        );
    }
    let t = &r.stats.timings;
    println!(
        "time: walk {} + page cache {} + allocator {} + zero scan {} = {}",
        fmt_us(t.walk_us as f64),
        fmt_us(t.cache_us as f64),
        fmt_us(t.allocator_us as f64),
        fmt_us(t.zero_us as f64),
        fmt_us(t.total_us as f64),
    );
}

/// Run `kscope color`.
pub fn color(a: ColorArgs) -> anyhow::Result<()> {
    if let Some(img) = &a.image {
        let r = color_image(img, a.profile, a.truth.as_deref(), a.vmcoreinfo.as_deref())?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print_image(&r);
        }
        return Ok(());
    }
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
    print_histogram(&r.stats, Some(&r.accuracy));
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
