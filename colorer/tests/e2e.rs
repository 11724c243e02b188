//! End-to-end coloring of synthetic kscope guests with known answers.

use kscope_colorer::accuracy::{self, expected_color};
use kscope_colorer::mem::{page_is_zero, PhysMem};
use kscope_colorer::synth::{build, SynthGuest, SynthSpec};
use kscope_colorer::{
    color, color_kscope, Color, ColorMap, ColorOptions, FileKind, GuestProfile, KscopeProfile,
    ProfileError, RootsOnlyProfile,
};
use kscope_guest::abi::kinfo::{frame_use, KInfo, KINFO_VERSION};
use kscope_guest::abi::layout::{DIRECT_MAP_BASE, KINFO_GPA, PAGE_SIZE};
use kscope_guest::abi::{as_bytes, from_bytes};

fn mismatches(g: &SynthGuest, map: &ColorMap) -> Vec<(u64, Color, Color)> {
    g.expected
        .iter()
        .zip(&map.colors)
        .enumerate()
        .filter(|(_, (e, c))| e != c)
        .map(|(i, (e, c))| (i as u64, *e, *c))
        .collect()
}

fn kinfo(mem: &[u8]) -> KInfo {
    from_bytes(&mem[KINFO_GPA as usize..]).unwrap()
}

fn set_kinfo(mem: &mut [u8], k: &KInfo) {
    let b = as_bytes(k);
    mem[KINFO_GPA as usize..KINFO_GPA as usize + b.len()].copy_from_slice(b);
}

#[test]
fn small_guest_colors_exactly() {
    let g = build(&SynthSpec::small()).unwrap();
    let map = color_kscope(&g.mem, None).unwrap();
    let bad = mismatches(&g, &map);
    assert!(
        bad.is_empty(),
        "{} mismatches (gfn, expected, got): {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
    // Every color occurs.
    for c in Color::ALL {
        if c != Color::Unknown {
            assert!(
                map.stats.counts.get(&c).copied().unwrap_or(0) > 0,
                "no {c} frame"
            );
        }
    }
    // Zero bits: exactly the frames with zero content.
    for gfn in 0..map.frames() {
        let want = page_is_zero(&g.mem, gfn).unwrap();
        assert_eq!(map.zero.contains(gfn), want, "zero bit of {gfn}");
    }
    // File order, per file.
    assert_eq!(map.file_pages.len(), g.files.len());
    for (fp, (ino, kind, pages)) in map.file_pages.iter().zip(&g.files) {
        assert_eq!((fp.ino, fp.kind), (*ino, *kind));
        let got: Vec<(u64, u64)> = fp
            .index
            .iter()
            .copied()
            .zip(fp.gfns.iter().copied())
            .collect();
        assert_eq!(&got, pages);
    }
    assert_eq!(map.file_pages[1].index, vec![0, 1, 2, 5, 64, 65, 4097]);
    assert_eq!(map.file_pages[0].name, "/bin/web");
    // Processes (the zombie is skipped) and their user frames.
    let procs: Vec<u32> = map.stats.processes.iter().map(|p| p.pid).collect();
    assert_eq!(procs, vec![1, 2]);
    assert_eq!(map.stats.processes[1].code_frames, 8);
    assert_eq!(map.stats.processes[1].data_frames, 8);
    assert_eq!(map.stats.processes[0].name, "/bin/web");
    assert_eq!(map.stats.anomalies, Default::default());
    assert_eq!(map.stats.walk.loops + map.stats.walk.table_out_of_range, 0);
    assert!(
        map.stats.walk.shared >= 2,
        "kernel half walked once: {:?}",
        map.stats.walk
    );
    let json = serde_json::to_string(&map.stats).unwrap();
    assert!(json.contains("\"page_cache_exec\""), "{json}");
}

#[test]
fn scaled_interwoven_guest_colors_exactly() {
    let g = build(&SynthSpec::scaled(64 << 20)).unwrap();
    let map = color_kscope(&g.mem, Some(g.procs[2].1)).unwrap();
    let bad = mismatches(&g, &map);
    assert!(
        bad.is_empty(),
        "{} mismatches: {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
    // Interwoven: user data frames are not one physical run.
    let ud: Vec<usize> = map
        .colors
        .iter()
        .enumerate()
        .filter(|(_, &c)| c == Color::UserData)
        .map(|(i, _)| i)
        .collect();
    assert!(ud.last().unwrap() - ud[0] > ud.len() * 2);
}

#[test]
fn accuracy_against_ground_truth() {
    let g = build(&SynthSpec::small()).unwrap();
    let map = color_kscope(&g.mem, None).unwrap();
    let truth = accuracy::read_ground_truth(&g.mem).unwrap();
    assert_eq!(truth.len() as u64, map.frames());
    // Every frame is either colored as its truth expects or zero.
    for (gfn, &t) in truth.iter().enumerate() {
        let c = map.colors[gfn];
        assert!(
            expected_color((t & 0xff) as u8) == Some(c) || c == Color::Zero,
            "frame {gfn}: truth {} color {c}",
            t & 0xff
        );
    }
    let r = accuracy::measure(&g.mem, &map).unwrap();
    assert!((r.accuracy_zero_ok - 1.0).abs() < 1e-12, "{r:?}");
    assert!(r.accuracy < 1.0 && r.accuracy > 0.9, "{}", r.accuracy);
    let pt = r
        .scores
        .iter()
        .find(|s| s.color == Color::PageTable)
        .unwrap();
    assert_eq!((pt.precision, pt.recall), (1.0, 1.0));
    assert_eq!(
        r.matrix["boot"].keys().collect::<Vec<_>>(),
        vec![&Color::KernelData]
    );
    assert!(r.matrix["kernel_data"].contains_key(&Color::Zero));
    assert!(serde_json::to_string(&r).unwrap().contains("user_code"));
}

#[test]
fn coloring_never_reads_the_ground_truth() {
    let g = build(&SynthSpec::small()).unwrap();
    let before = color_kscope(&g.mem, None).unwrap();
    // Rewrite the truth table with nonsense (keeping each frame's zero-ness) and point the
    // descriptor at an unmapped address: the colors must not change.
    let mut mem = g.mem.clone();
    let k = kinfo(&mem);
    let truth_pa = (k.ground_truth - DIRECT_MAP_BASE) as usize;
    for w in mem[truth_pa..truth_pa + 4 * k.frame_count as usize].chunks_exact_mut(4) {
        if w != [0; 4] {
            w.copy_from_slice(&u32::from(frame_use::PAGE_TABLE).to_le_bytes());
        }
    }
    let mut k2 = k;
    k2.ground_truth = 0xffff_dead_0000_0000;
    set_kinfo(&mut mem, &k2);
    let after = color_kscope(&mem, None).unwrap();
    assert_eq!(before.colors, after.colors);
    assert_eq!(before.zero, after.zero);
    assert!(accuracy::read_ground_truth(&mem).is_err());
    // Source-level guard: only accuracy.rs (and the synthetic builder, which writes it)
    // names the table.
    for (name, src) in [
        ("color.rs", include_str!("../src/color.rs")),
        ("kscope.rs", include_str!("../src/kscope.rs")),
        ("pagewalk.rs", include_str!("../src/pagewalk.rs")),
        ("profile.rs", include_str!("../src/profile.rs")),
        ("radix.rs", include_str!("../src/radix.rs")),
        ("mem.rs", include_str!("../src/mem.rs")),
        ("lib.rs", include_str!("../src/lib.rs")),
        ("cost.rs", include_str!("../src/cost.rs")),
    ] {
        assert!(
            !src.contains("ground_truth") && !src.contains("frame_use"),
            "{name} names the ground truth"
        );
    }
}

#[test]
fn descriptor_errors_are_clear() {
    let g = build(&SynthSpec::small()).unwrap();
    let mut mem = g.mem.clone();
    let k = kinfo(&mem);

    let mut bad = k;
    bad.magic = 0;
    set_kinfo(&mut mem, &bad);
    let e = KscopeProfile::open(&mem).err().unwrap();
    assert!(
        matches!(e, ProfileError::NotFound { .. }) && e.to_string().contains("READY"),
        "{e}"
    );

    let mut bad = k;
    bad.version = KINFO_VERSION + 1;
    set_kinfo(&mut mem, &bad);
    let e = KscopeProfile::open(&mem).err().unwrap();
    assert!(
        matches!(e, ProfileError::Version { .. }) && e.to_string().contains("rebuild"),
        "{e}"
    );

    for f in [
        |k: &mut KInfo| k.kernel_pml4 = 1 << 40,
        |k: &mut KInfo| k.kernel_pml4 += 8,
        |k: &mut KInfo| k.mem_bytes = 1 << 40,
        |k: &mut KInfo| k.direct_map_base = 0x1000,
        |k: &mut KInfo| k.text_end = k.text_start - 1,
        |k: &mut KInfo| k.frame_count = 1 << 40,
        |k: &mut KInfo| k.proc_stride = 8,
        |k: &mut KInfo| k.file_max = u32::MAX,
        |k: &mut KInfo| k.size = 8,
    ] {
        let mut bad = k;
        f(&mut bad);
        set_kinfo(&mut mem, &bad);
        assert!(KscopeProfile::open(&mem).is_err());
    }
    // Memory too small to hold the descriptor.
    assert!(KscopeProfile::open(&g.mem[..0x9010]).is_err());
}

#[test]
fn corrupt_structures_are_tolerated() {
    let g = build(&SynthSpec::small()).unwrap();
    let mut mem = g.mem.clone();
    let k = kinfo(&mem);
    // A process whose CR3 is outside RAM, one with garbage state.
    let proc_pa = (k.proc_table - k.kernel_virt_base) as usize;
    mem[proc_pa + 8..proc_pa + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    mem[proc_pa + 128..proc_pa + 132].copy_from_slice(&77u32.to_le_bytes());
    // A radix root pointing into the middle of a page of garbage.
    let file_pa = (k.file_table - DIRECT_MAP_BASE) as usize;
    mem[file_pa + 16..file_pa + 24].copy_from_slice(&(DIRECT_MAP_BASE + 0x10_0010).to_le_bytes());
    // A file with an unknown kind.
    mem[file_pa + 256..file_pa + 260].copy_from_slice(&9u32.to_le_bytes());
    // Garbage in the kernel PML4's unused entries.
    let pml4 = k.kernel_pml4 as usize;
    for i in 1..200 {
        let v = (i as u64 * 0x1_2345_6000) | 1;
        if mem[pml4 + i * 8..pml4 + i * 8 + 8] == [0; 8] {
            mem[pml4 + i * 8..pml4 + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    let map = color_kscope(&mem, Some(1 << 45)).unwrap();
    let a = map.stats.anomalies;
    assert_eq!(a.bad_processes, 2); // the CR3 outside RAM and the garbage state
    assert_eq!(a.bad_files, 1);
    assert!(a.bad_radix_nodes >= 1, "{a:?}");
    assert_eq!(map.stats.bad_roots, 1); // the extra root
    assert!(map.stats.walk.table_out_of_range > 0);
    assert_eq!(map.stats.processes.len(), 0);
}

#[test]
fn roots_only_profile_is_guest_agnostic() {
    let g = build(&SynthSpec::small()).unwrap();
    let mut roots = vec![g.kernel_pml4];
    roots.extend(g.procs.iter().map(|p| p.1));
    let p = RootsOnlyProfile {
        roots,
        ignored: std::iter::once(DIRECT_MAP_BASE..DIRECT_MAP_BASE + (1 << 30)).collect(),
    };
    assert_eq!(p.name(), "roots-only");
    let map = color(&g.mem, &p, &ColorOptions::default()).unwrap();
    for (gfn, (&e, &c)) in g.expected.iter().zip(&map.colors).enumerate() {
        match e {
            Color::PageTable | Color::UserCode | Color::KernelCode => {
                assert_eq!(c, e, "frame {gfn}")
            }
            Color::UserData => assert_eq!(c, Color::UserData, "frame {gfn}"),
            _ => {}
        }
    }
    // Without radix trees and bitmap, no cache or free colors.
    assert!(!map.stats.counts.contains_key(&Color::Free));
    assert!(!map.stats.counts.contains_key(&Color::PageCacheData));
    assert!(map.stats.counts.contains_key(&Color::Unknown));
    // Read-only mapped executable cache pages look like user data without the trees.
    let exec = &g.files.iter().find(|f| f.1 == FileKind::Exec).unwrap().2;
    assert_eq!(map.color(exec[20].1), Color::UserData);
}

#[test]
fn synthetic_cost_measurement() {
    let r = kscope_colorer::cost::measure_synthetic(32 << 20, 2).unwrap();
    assert_eq!(r.mem_bytes, 32 << 20);
    assert!(r.min_ms > 0.0 && r.min_ms <= r.median_ms && r.mib_per_s > 0.0);
    assert_eq!(r.stats.frames, (32 << 20) / PAGE_SIZE);
    assert!(r.stats.timings.total_us >= r.stats.timings.zero_us);
    let mem: &[u8] = &[];
    assert_eq!(mem.size(), 0);
}
