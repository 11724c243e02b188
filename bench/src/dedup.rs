//! `kscope bench dedup`: color-targeted deduplication (Kaleidoscope) against brute force.
//!
//! Several parents are booted from the same image and warmed, each is cloned lazily and the
//! clones serve requests. Every frame that a VM holds in host memory (a parent: every non-zero
//! frame; a lazy clone: every non-zero frame installed in it) is a candidate. The brute-force
//! baseline hashes every candidate; the targeted scan hashes only the frames whose color (from
//! the parent's generation image) is likely shared: kernel code, user code, page cache of
//! executables and of (read-only) data files. Effort = frames hashed and time; savings =
//! duplicate frames found (frames that could be freed by sharing one copy).
//!
//! With `ksm`, the candidates are also copied into anonymous private memory
//! ([`AnonFrames`]) and Linux KSM merges them for real, copy-on-write: once with only the
//! targeted frames marked `MADV_MERGEABLE`, once with all; effort = pages KSM scanned, savings
//! = `pages_sharing`.
//!
//! Also with `ksm`, the **live** mode: the clones are created with
//! [`CloneOptions::anon_memory`], so their own guest memory is anonymous private memory that
//! KSM can merge while they run. After serving their requests, first only the targeted
//! colors' installed non-zero frames are marked mergeable ([`Vm::mark_mergeable`]) and ksmd
//! runs, then all of them; after each pass every clone serves requests again, checked by the
//! workload's checker (copy-on-write must keep them correct).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use anyhow::Context;
use kscope_colorer::{Color, ColorMap};
use kscope_vmm::dedup::{AnonFrames, Ksm};
use kscope_vmm::lazy::PAGE_SIZE;
use kscope_vmm::{CloneOptions, Vm};
use kscope_workloads::Workload;
use serde::Serialize;

use crate::runner::{self, drive};

/// Colors hashed by the targeted scan.
pub const TARGET_COLORS: [Color; 4] = [
    Color::KernelCode,
    Color::UserCode,
    Color::PageCacheExec,
    Color::PageCacheData,
];

/// One candidate frame: which VM, its color, its content.
pub struct Frame {
    /// Index of the VM holding it.
    pub vm: usize,
    /// Guest frame number.
    pub gfn: u64,
    /// Its color.
    pub color: Color,
    /// Its content.
    pub data: Box<[u8; PAGE_SIZE]>,
}

/// Effort and savings of one scan.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScanResult {
    /// Frames hashed.
    pub hashed: u64,
    /// Time spent hashing and grouping.
    pub hash_ms: f64,
    /// Frames whose content equals an earlier hashed frame's (could be freed).
    pub duplicates: u64,
}

/// Hash the frames selected by `select` and count duplicates (content-identical frames beyond
/// the first of each group). Frames are compared by a 64-bit SipHash of their content plus
/// their length, whose collision probability at these sizes (< 10^6 frames) is below 10^-7.
pub fn scan(frames: &[Frame], select: impl Fn(&Frame) -> bool) -> ScanResult {
    let t = Instant::now();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut r = ScanResult::default();
    for f in frames.iter().filter(|f| select(f)) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        f.data[..].hash(&mut h);
        let n = seen.entry(h.finish()).or_insert(0);
        if *n > 0 {
            r.duplicates += 1;
        }
        *n += 1;
        r.hashed += 1;
    }
    r.hash_ms = t.elapsed().as_secs_f64() * 1e3;
    r
}

/// Duplicates per color under brute force (where the savings are).
pub fn duplicates_by_color(frames: &[Frame]) -> Vec<(String, u64, u64)> {
    let mut by: HashMap<Color, (u64, u64)> = HashMap::new();
    let mut seen: HashMap<u64, ()> = HashMap::new();
    for f in frames {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        f.data[..].hash(&mut h);
        let e = by.entry(f.color).or_default();
        e.0 += 1;
        if seen.insert(h.finish(), ()).is_some() {
            e.1 += 1;
        }
    }
    let mut v: Vec<(String, u64, u64)> = Color::ALL
        .iter()
        .filter_map(|c| by.get(c).map(|&(n, d)| (c.name().to_string(), n, d)))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.2));
    v
}

/// Real KSM merging of the candidates.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KsmResult {
    /// Frames marked mergeable.
    pub marked: u64,
    /// Pages KSM scanned.
    pub pages_scanned: u64,
    /// Full scans completed.
    pub full_scans: u64,
    /// Frames freed by sharing (`pages_sharing`).
    pub pages_sharing: u64,
    /// Shared copies kept (`pages_shared`).
    pub pages_shared: u64,
    /// Wall time ksmd ran.
    pub ksm_ms: f64,
}

/// Copy the frames into anonymous memory (one region per VM, frames packed), mark those
/// selected mergeable (in runs), let ksmd complete `scans` full scans, read the counters.
pub fn ksm_merge(
    frames: &[Frame],
    vms: usize,
    select: impl Fn(&Frame) -> bool,
    scans: u64,
) -> anyhow::Result<KsmResult> {
    let ksm = Ksm::open().context("taking control of KSM")?;
    let mut regions = Vec::new();
    for v in 0..vms {
        let mine: Vec<&Frame> = frames.iter().filter(|f| f.vm == v).collect();
        let mut m = AnonFrames::new(mine.len().max(1) as u64)?;
        let mut run: Option<(u64, u64)> = None;
        let mut marked = 0u64;
        for (i, f) in mine.iter().enumerate() {
            let i = i as u64;
            m.write_frame(i, &f.data)?;
            if select(f) {
                marked += 1;
                run = match run {
                    Some((s, n)) if s + n == i => Some((s, n + 1)),
                    Some((s, n)) => {
                        m.mergeable(s, n)?;
                        Some((i, 1))
                    }
                    None => Some((i, 1)),
                };
            }
        }
        if let Some((s, n)) = run {
            m.mergeable(s, n)?;
        }
        regions.push((m, marked));
    }
    let before = ksm.counters()?;
    let t = ksm.scan(4096, scans, Duration::from_secs(120))?;
    let after = ksm.counters()?;
    let r = KsmResult {
        marked: regions.iter().map(|r| r.1).sum(),
        pages_scanned: after.pages_scanned.saturating_sub(before.pages_scanned),
        full_scans: after.full_scans - before.full_scans,
        pages_sharing: after.pages_sharing,
        pages_shared: after.pages_shared,
        ksm_ms: t.as_secs_f64() * 1e3,
    };
    drop(regions);
    drop(ksm);
    Ok(r)
}

/// Real KSM merging of the clones' live memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveKsmResult {
    /// What ksmd did with the selected frames marked mergeable.
    pub ksm: KsmResult,
    /// Pages of this process merged by KSM (`/proc/self/ksm_merging_pages`; the live clones
    /// are the only mergeable memory), `None` on kernels without the file.
    pub process_merging_pages: Option<u64>,
    /// Duplicates the hash scan predicts among the marked frames (an upper bound: frames
    /// changed by the clones' idle activity since they were read may no longer match).
    pub predicted: u64,
    /// Requests every clone served correctly after the merge.
    pub verified_requests: usize,
}

/// Pages of this process merged by KSM.
fn process_merging_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/self/ksm_merging_pages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Mark the selected frames of the live clones mergeable (cumulatively: earlier marks stay),
/// run ksmd for `scans` full scans, then check every clone still answers correctly.
fn ksm_live(
    ksm: &Ksm,
    frames: &[Frame],
    clones: &[(usize, &Vm)],
    select: impl Fn(&Frame) -> bool,
    scans: u64,
    w: Workload,
    requests: usize,
) -> anyhow::Result<LiveKsmResult> {
    let mut marked = 0u64;
    for &(idx, vm) in clones {
        let gfns: Vec<u64> = frames
            .iter()
            .filter(|f| f.vm == idx && select(f))
            .map(|f| f.gfn)
            .collect();
        marked += vm
            .mark_mergeable(&gfns)
            .with_context(|| format!("marking frames of {} mergeable", vm.name()))?
            as u64;
    }
    let predicted = scan(frames, |f| clones.iter().any(|c| c.0 == f.vm) && select(f)).duplicates;
    let before = ksm.counters()?;
    let t = ksm.scan(4096, scans, Duration::from_secs(120))?;
    let after = ksm.counters()?;
    let process_merging_pages = process_merging_pages();
    for (i, &(_, vm)) in clones.iter().enumerate() {
        drive(vm, w, &w.requests(500 + i as u64, requests), 4, true).with_context(|| {
            format!("{} answers wrongly after KSM merged its memory", vm.name())
        })?;
    }
    Ok(LiveKsmResult {
        ksm: KsmResult {
            marked,
            pages_scanned: after.pages_scanned.saturating_sub(before.pages_scanned),
            full_scans: after.full_scans - before.full_scans,
            pages_sharing: after.pages_sharing,
            pages_shared: after.pages_shared,
            ksm_ms: t.as_secs_f64() * 1e3,
        },
        process_merging_pages,
        predicted,
        verified_requests: requests,
    })
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DedupConfig {
    /// Workload.
    pub workload: Workload,
    /// Parents booted from the same image.
    pub parents: usize,
    /// Lazy clones per parent.
    pub clones: usize,
    /// Requests per VM.
    pub requests: usize,
    /// Guest memory.
    pub mem_bytes: u64,
    /// Also merge for real with KSM.
    pub ksm: bool,
}

/// Everything `kscope bench dedup` reports.
#[derive(Clone, Debug, Serialize)]
pub struct DedupReport {
    /// Workload.
    pub workload: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Parents.
    pub parents: usize,
    /// Clones per parent.
    pub clones: usize,
    /// Candidate frames (non-zero frames held by all VMs).
    pub candidates: u64,
    /// Colors the targeted scan hashes.
    pub target_colors: Vec<String>,
    /// Hash every candidate.
    pub brute: ScanResult,
    /// Hash only the targeted colors.
    pub targeted: ScanResult,
    /// Brute-force duplicates per color: (color, frames, duplicates).
    pub by_color: Vec<(String, u64, u64)>,
    /// KSM with everything mergeable.
    pub ksm_brute: Option<KsmResult>,
    /// KSM with only the targeted colors mergeable.
    pub ksm_targeted: Option<KsmResult>,
    /// Live clones: KSM with only the targeted colors' frames of the clones mergeable.
    pub live_targeted: Option<LiveKsmResult>,
    /// Live clones: then with all their installed non-zero frames mergeable.
    pub live_all: Option<LiveKsmResult>,
}

fn collect(
    vm: &Vm,
    idx: usize,
    map: &ColorMap,
    only: Option<&kscope_vmm::lazy::Bitmap>,
    out: &mut Vec<Frame>,
) -> anyhow::Result<()> {
    let pages = vm.mem_bytes() / PAGE_SIZE as u64;
    for g in 0..pages {
        if only.is_some_and(|b| !b.get(g)) {
            continue;
        }
        let mut data = Box::new([0u8; PAGE_SIZE]);
        vm.read_phys(g * PAGE_SIZE as u64, &mut data[..])
            .with_context(|| format!("reading frame {g} of {}", vm.name()))?;
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        let color = map
            .colors
            .get(g as usize)
            .copied()
            .unwrap_or(Color::Unknown);
        out.push(Frame {
            vm: idx,
            gfn: g,
            color,
            data,
        });
    }
    Ok(())
}

/// Run the benchmark.
pub fn run(cfg: &DedupConfig) -> anyhow::Result<DedupReport> {
    let w = cfg.workload;
    let mut frames = Vec::new();
    let mut vms = 0usize;
    // With KSM, the clones are kept running (anonymous memory) for the live mode.
    let mut live: Vec<(usize, Vm)> = Vec::new();
    let mut parents = Vec::new();
    let clone_opts = CloneOptions {
        anon_memory: cfg.ksm,
        ..CloneOptions::default()
    };
    for p in 0..cfg.parents.max(1) {
        let b = runner::boot(w, cfg.mem_bytes, &format!("{}-dedup-p{p}", w.name()))?;
        let parent = b.vm;
        drive(
            &parent,
            w,
            &w.requests(10 + p as u64, cfg.requests),
            4,
            true,
        )
        .context("warming a parent")?;
        parent.pause().context("pausing a parent")?;
        let generation = parent.freeze().context("freezing a parent")?;
        let (map, _) =
            kscope_policies::color_generation(&generation).context("coloring a parent's image")?;
        let batch = generation
            .spawn(cfg.clones, &clone_opts)
            .context("cloning a parent")?;
        collect(&parent, vms, &map, None, &mut frames)?;
        vms += 1;
        for (i, c) in batch.children.iter().enumerate() {
            drive(c, w, &w.requests(100 + i as u64, cfg.requests), 4, true)
                .with_context(|| format!("driving clone {}", c.name()))?;
            let present = c
                .fault_server()
                .context("a clone is not lazily served")?
                .present_bitmap();
            collect(c, vms + i, &map, Some(&present), &mut frames)?;
        }
        for c in batch.children {
            if cfg.ksm {
                live.push((vms, c));
            } else {
                let _ = c.stop();
            }
            vms += 1;
        }
        if cfg.ksm {
            parents.push(parent);
        } else {
            let _ = parent.stop();
        }
    }
    let targeted_sel = |f: &Frame| TARGET_COLORS.contains(&f.color);
    let brute = scan(&frames, |_| true);
    let targeted = scan(&frames, targeted_sel);
    let by_color = duplicates_by_color(&frames);
    let (ksm_brute, ksm_targeted) = if cfg.ksm {
        (
            Some(ksm_merge(&frames, vms, |_| true, 3)?),
            Some(ksm_merge(&frames, vms, targeted_sel, 3)?),
        )
    } else {
        (None, None)
    };
    let (live_targeted, live_all) = if cfg.ksm {
        let ksm = Ksm::open().context("taking control of KSM")?;
        let clones: Vec<(usize, &Vm)> = live.iter().map(|(i, c)| (*i, c)).collect();
        let reqs = cfg.requests.min(20);
        let t = ksm_live(&ksm, &frames, &clones, targeted_sel, 3, w, reqs)?;
        let a = ksm_live(&ksm, &frames, &clones, |_| true, 3, w, reqs)?;
        for (_, c) in &live {
            let _ = c.stop();
        }
        drop(ksm);
        (Some(t), Some(a))
    } else {
        (None, None)
    };
    for p in &parents {
        let _ = p.stop();
    }
    Ok(DedupReport {
        workload: w.name().into(),
        mem_mib: cfg.mem_bytes >> 20,
        parents: cfg.parents,
        clones: cfg.clones,
        candidates: frames.len() as u64,
        target_colors: TARGET_COLORS.iter().map(|c| c.name().to_string()).collect(),
        brute,
        targeted,
        by_color,
        ksm_brute,
        ksm_targeted,
        live_targeted,
        live_all,
    })
}

/// The report as text, with the targeted scan's effort and savings relative to brute force.
pub fn render(r: &DedupReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    let _ = writeln!(
        s,
        "dedup of {} ({} MiB): {} parents from one image x {} lazy clones each; {} candidate frames (non-zero, held in host memory)",
        r.workload, r.mem_mib, r.parents, r.clones, r.candidates
    );
    let _ = writeln!(
        s,
        "{:<24} {:>10} {:>10} {:>11}",
        "scan", "hashed", "time ms", "duplicates"
    );
    for (n, x) in [
        ("brute force (all)", &r.brute),
        ("targeted colors", &r.targeted),
    ] {
        let _ = writeln!(
            s,
            "{n:<24} {:>10} {:>10.1} {:>11}",
            x.hashed, x.hash_ms, x.duplicates
        );
    }
    let _ = writeln!(
        s,
        "targeted ({}): {:.1}% of the effort (frames hashed), {:.1}% of the time, {:.1}% of the savings",
        r.target_colors.join(", "),
        pct(r.targeted.hashed, r.brute.hashed),
        100.0 * r.targeted.hash_ms / r.brute.hash_ms.max(1e-9),
        pct(r.targeted.duplicates, r.brute.duplicates)
    );
    let _ = writeln!(s, "brute-force duplicates by color (frames, duplicates):");
    for (c, n, d) in &r.by_color {
        let _ = writeln!(s, "  {c:<16} {n:>8} {d:>8}");
    }
    if let (Some(b), Some(t)) = (&r.ksm_brute, &r.ksm_targeted) {
        let _ = writeln!(
            s,
            "KSM (real copy-on-write merging of the candidates in anonymous memory):"
        );
        for (n, x) in [("all mergeable", b), ("targeted mergeable", t)] {
            let _ = writeln!(
                s,
                "  {n:<20} marked {:>8}, scanned {:>9} pages in {} full scans, {:.0} ms; pages_sharing {} (shared copies {})",
                x.marked, x.pages_scanned, x.full_scans, x.ksm_ms, x.pages_sharing, x.pages_shared
            );
        }
        let per_scan = |x: &KsmResult| x.pages_scanned as f64 / x.full_scans.max(1) as f64;
        let _ = writeln!(
            s,
            "  targeted: {:.1}% of the pages scanned per full scan for {:.1}% of the frames freed",
            100.0 * per_scan(t) / per_scan(b).max(1e-9),
            pct(t.pages_sharing, b.pages_sharing)
        );
    }
    if let (Some(t), Some(a)) = (&r.live_targeted, &r.live_all) {
        let _ = writeln!(
            s,
            "KSM on the clones' live memory (anon-memory clones, installed non-zero frames marked; targeted first, then all):"
        );
        for (n, x) in [("targeted mergeable", t), ("all mergeable", a)] {
            let _ = writeln!(
                s,
                "  {n:<20} marked {:>8}, {} full scans, {:.0} ms; pages_sharing {} (shared copies {}), this process's merged pages {}, hash-predicted duplicates {}; {} requests per clone answered correctly afterwards",
                x.ksm.marked,
                x.ksm.full_scans,
                x.ksm.ksm_ms,
                x.ksm.pages_sharing,
                x.ksm.pages_shared,
                x.process_merging_pages.map_or("n/a".into(), |n| n.to_string()),
                x.predicted,
                x.verified_requests
            );
        }
        let _ = writeln!(
            s,
            "  targeted: {:.1}% of the frames marked for {:.1}% of the pages_sharing",
            pct(t.ksm.marked, a.ksm.marked),
            pct(t.ksm.pages_sharing, a.ksm.pages_sharing)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(vm: usize, gfn: u64, color: Color, byte: u8) -> Frame {
        Frame {
            vm,
            gfn,
            color,
            data: Box::new([byte; PAGE_SIZE]),
        }
    }

    #[test]
    fn scans_count_duplicates_among_hashed_frames() {
        let fs = vec![
            frame(0, 1, Color::KernelCode, 1),
            frame(1, 1, Color::KernelCode, 1),
            frame(2, 1, Color::KernelCode, 1),
            frame(0, 2, Color::UserData, 2),
            frame(1, 2, Color::UserData, 2),
            frame(1, 3, Color::UserData, 3),
            // Same content as a kernel-code frame but a data color: only brute force sees it.
            frame(2, 5, Color::KernelData, 1),
        ];
        let b = scan(&fs, |_| true);
        assert_eq!((b.hashed, b.duplicates), (7, 4));
        let t = scan(&fs, |f| TARGET_COLORS.contains(&f.color));
        assert_eq!((t.hashed, t.duplicates), (3, 2));
        let by = duplicates_by_color(&fs);
        assert_eq!(by[0], ("kernel_code".to_string(), 3, 2));
        assert!(by.contains(&("user_data".to_string(), 3, 1)));
        assert!(by.contains(&("kernel_data".to_string(), 1, 1)));
    }

    #[test]
    fn one_byte_differences_are_not_duplicates() {
        let mut a = frame(0, 0, Color::UserCode, 9);
        a.data[4095] = 8;
        let fs = vec![a, frame(1, 0, Color::UserCode, 9)];
        assert_eq!(scan(&fs, |_| true).duplicates, 0);
    }
}
