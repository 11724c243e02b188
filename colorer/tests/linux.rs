//! The Linux profile on real Linux memory: boot a Debian cloud kernel under qemu TCG with two
//! workloads (colorer/linux/make-image.sh, cached under ~/.cache/kscope/linux), color the ELF
//! memory images, and check them against the kernel's own accounting read inside the guest
//! at the same moment (/proc/kpageflags, maps + pagemap, page-cache residency).
//!
//! Skips (loudly) only if the script reports that qemu or the kernel package cannot be
//! installed (exit status 3); any other failure fails the test.

use kscope_colorer::linux::truth::{compare, table_breakdown, Truth};
use kscope_colorer::linux::{ElfCore, LinuxError, LinuxImage};
use kscope_colorer::{Color, PhysMem};
use std::path::PathBuf;
use std::process::Command;

fn make_image(workload: &str) -> Option<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/linux/make-image.sh");
    let out = Command::new("bash")
        .args([script, "--workload", workload])
        .output()
        .expect("running make-image.sh");
    let log = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            eprintln!(
                "\n\n*** SKIPPED: the Linux image cannot be made on this machine (qemu or the \
                 kernel package cannot be installed):\n{log}\n***\n"
            );
            return None;
        }
        c => panic!("make-image.sh --workload {workload} failed ({c:?}):\n{log}"),
    }
    let dir = String::from_utf8_lossy(&out.stdout);
    Some(PathBuf::from(
        dir.lines()
            .last()
            .expect("make-image.sh prints the directory"),
    ))
}

fn score(a: &kscope_colorer::accuracy::AccuracyReport, c: Color) -> (f64, f64) {
    a.scores
        .iter()
        .find(|s| s.color == c)
        .map(|s| (s.precision, s.recall))
        .unwrap_or((1.0, 1.0))
}

#[test]
fn linux_images_match_kpageflags() {
    for workload in ["files", "anon"] {
        let Some(dir) = make_image(workload) else {
            return;
        };
        let img = LinuxImage::open(&dir.join("image.elf")).expect("opening the image");
        let map = img.color().expect("coloring");
        let truth = Truth::open(&dir.join("truth.bin")).expect("reading the truth");
        let acc = compare(&truth, &map).expect("comparing");
        let r = &acc.report;
        eprintln!(
            "{workload}: {} accuracy {:.4} (zero ok {:.4}), {} roots, {} files, color {} us",
            img.profile.layout.release,
            r.accuracy,
            r.accuracy_zero_ok,
            img.profile.processes_len(),
            map.stats.files,
            map.stats.timings.total_us
        );
        assert!(r.accuracy >= 0.95, "{workload}: accuracy {}", r.accuracy);
        for c in [
            Color::PageCacheData,
            Color::PageCacheExec,
            Color::UserData,
            Color::UserCode,
        ] {
            let (p, rc) = score(r, c);
            assert!(
                p >= 0.95 && rc >= 0.95,
                "{workload}: {c} precision {p} recall {rc}"
            );
        }
        // Page tables: every frame the kernel flags is found; where the kernel flags tables
        // (process PTE and PMD pages) walking and flags agree. Levels 6.1 does not flag
        // (PGD/PUD, kernel PTEs) are counted apart (docs/LINUX-PROFILE.md).
        let (_, pt_recall) = score(r, Color::PageTable);
        assert!(
            pt_recall >= 0.95,
            "{workload}: page-table recall {pt_recall}"
        );
        let tb = table_breakdown(&truth, &img.table_levels());
        assert!(tb.flagged_levels_agreement >= 0.95, "{workload}: {tb:?}");
        // Free memory: the colorer finds every free frame; the truth's count is the kernel's.
        let (_, free_recall) = score(r, Color::Free);
        assert!(free_recall >= 0.99, "{workload}: free recall {free_recall}");
        assert_eq!(Some(acc.truth_free_frames), acc.nr_free_pages, "{workload}");
        assert!(
            img.profile.processes_len() >= 4,
            "{workload}: process roots"
        );
        assert!(map.stats.counts[&Color::KernelCode] > 1000);
    }
}

/// The same memory as raw guest-physical bytes (as a kscope snapshot's memory file holds it)
/// with VMCOREINFO given apart colors the same.
#[test]
fn raw_memory_with_separate_vmcoreinfo_colors_the_same() {
    let Some(dir) = make_image("files") else {
        return;
    };
    let img = LinuxImage::open(&dir.join("image.elf")).unwrap();
    let map = img.color().unwrap();
    let mut raw = vec![0u8; img.core.size() as usize];
    for s in img.core.segments() {
        let end = (s.paddr + s.len).min(img.core.size());
        if s.paddr < end {
            img.core
                .read(s.paddr, &mut raw[s.paddr as usize..end as usize])
                .unwrap();
        }
    }
    let (_, raw_map) =
        kscope_colorer::linux::color_raw(&raw, img.core.vmcoreinfo().unwrap()).unwrap();
    let differ = map
        .colors
        .iter()
        .zip(&raw_map.colors)
        .filter(|(a, b)| a != b)
        .count();
    // Only the vCPU root (walked from the ELF's CPU note) and the VGA hole (unreadable in
    // the ELF, zero in the raw copy) may differ.
    assert!(differ <= 64, "{differ} frames differ");
    assert!(kscope_colorer::linux::color_raw(&raw, "PAGESIZE=4096\n").is_err());
}

#[test]
fn bad_linux_images_get_clear_errors() {
    let Some(dir) = make_image("files") else {
        return;
    };
    let bytes = std::fs::read(dir.join("image.elf")).unwrap();
    // Truncated.
    let e = ElfCore::parse(bytes[..bytes.len() / 2].to_vec())
        .err()
        .unwrap();
    assert!(e.to_string().contains("truncated"), "{e}");
    // An unknown kernel version: the same image claiming another release.
    for (fake, why) in [("OSRELEASE=3.1", "4.18"), ("OSRELEASE=9.1", "6.9")] {
        let mut b = bytes.clone();
        let at = b
            .windows(13)
            .position(|w| w == b"OSRELEASE=6.1")
            .expect("VMCOREINFO in the image");
        b[at..at + 13].copy_from_slice(fake.as_bytes());
        let e = LinuxImage::from_core(ElfCore::parse(b).unwrap())
            .err()
            .unwrap();
        assert!(matches!(e, LinuxError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("unknown kernel version"), "{e}");
        let _ = why;
    }
    // No VMCOREINFO: rename the note.
    let mut b = bytes.clone();
    let at = b.windows(11).position(|w| w == b"VMCOREINFO\0").unwrap();
    b[at] = b'X';
    let e = LinuxImage::from_core(ElfCore::parse(b).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("no VMCOREINFO"), "{e}");
    // A missing field: VMCOREINFO without SIZE(page).
    let mut b = bytes;
    let at = b.windows(10).position(|w| w == b"SIZE(page)").unwrap();
    b[at] = b'X';
    let e = LinuxImage::from_core(ElfCore::parse(b).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("SIZE(page)"), "{e}");
}
