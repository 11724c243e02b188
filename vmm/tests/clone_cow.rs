//! Copy-on-write capture of later generations (`vmm/src/clone/cow.rs`) under real KVM: a
//! parent that keeps writing while it is cloned again and again never changes what its
//! clones see, and the pause copies nothing.

#[path = "clone_support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kscope_vmm::{CloneOptions, Vm};
use support::{ask, boot};

const MB: u64 = 1 << 20;

fn read_u64(vm: &Vm, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    vm.read_phys(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Two host threads write the parent while it is cloned 100 times: one stores an increasing
/// counter in two pages through the VMM (A, then B), the guest allocates and writes memory
/// in a loop. Every generation must hold a consistent, non-decreasing counter, and a child
/// keeps the value of its generation while the parent goes on writing.
#[test]
fn a_parent_writing_hot_pages_while_cloned_100_times() {
    let parent = Arc::new(boot("p-cow", 64 * MB));
    // First freeze: the parent moves to its private view; later freezes are copy-on-write.
    let first = parent.clone_children(1, &CloneOptions::default()).unwrap();
    drop(first);
    // Two pages of the boot area that nothing uses (below LOW_RESERVED_END, never given to
    // the guest's allocator: the guest writer below must not write them too).
    let (a, b) = (0x60000, 0x63000);
    assert!(b < kscope_guest::abi::layout::LOW_RESERVED_END);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let vmm_writer = {
        let (parent, stop, written) = (parent.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 1u64;
            while !stop.load(Ordering::Relaxed) {
                parent.write_phys(a, &i.to_le_bytes()).unwrap();
                parent.write_phys(b, &i.to_le_bytes()).unwrap();
                written.store(i, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let guest_writer = {
        let (parent, stop) = (parent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(ask(&parent, "alloc 16"), "ok 16 136");
                n += 1;
            }
            n
        })
    };
    let opts = CloneOptions {
        start_paused: true,
        ..Default::default()
    };
    let mut last = 0u64;
    let mut kept = Vec::new();
    let mut protected = 0u64;
    for k in 0..100 {
        let batch = parent.clone_children(1, &opts).unwrap();
        assert_eq!(
            batch.freeze.pages_copied, 0,
            "clone {k}: copied while paused"
        );
        protected += batch.freeze.pages_protected;
        let child = &batch.children[0];
        let (va, vb) = (read_u64(child, a), read_u64(child, b));
        assert!(
            va == vb || va == vb + 1,
            "clone {k}: A={va} B={vb}: not one moment of the parent"
        );
        assert!(
            va >= last,
            "clone {k}: counter went back from {last} to {va}"
        );
        assert_eq!(read_u64(child, a), va);
        let mut img = [0u8; 8];
        batch.generation.read_phys(a, &mut img).unwrap();
        assert_eq!(
            u64::from_le_bytes(img),
            va,
            "clone {k}: image and child differ"
        );
        last = va;
        if k % 25 == 0 {
            kept.push((batch, va, vb));
        }
    }
    // The parent goes on writing after the last clone (bounded wait: a loaded host may not
    // have scheduled the writer since).
    let t = std::time::Instant::now();
    while written.load(Ordering::Relaxed) <= last
        && t.elapsed() < std::time::Duration::from_secs(20)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    vmm_writer.join().unwrap();
    let guest_rounds = guest_writer.join().unwrap();
    let end = written.load(Ordering::Relaxed);
    assert!(end > last, "the parent kept writing ({end} > {last})");
    assert_eq!(read_u64(&parent, a), end);
    // Children keep their generation's values while the parent went on, and run correctly.
    for (batch, va, vb) in &kept {
        let c = &batch.children[0];
        assert_eq!((read_u64(c, a), read_u64(c, b)), (*va, *vb));
        c.resume().unwrap();
        assert_eq!(ask(c, "alloc 32"), "ok 32 528");
        // A child's write reaches neither the parent nor a sibling.
        c.write_phys(a, &u64::MAX.to_le_bytes()).unwrap();
        assert_eq!(read_u64(&parent, a), end);
    }
    for (batch, va, _) in &kept {
        assert_eq!(read_u64(&batch.children[0], a), u64::MAX);
        let mut img = [0u8; 8];
        batch.generation.read_phys(a, &mut img).unwrap();
        assert_eq!(
            u64::from_le_bytes(img),
            *va,
            "a child's write reached its image"
        );
    }
    println!(
        "100 clones of a writing parent: counter {last} at the last clone, {end} at the end, \
         {guest_rounds} guest allocation rounds, {protected} pages write-protected in all"
    );
    assert!(protected > 0, "later freezes captured copy-on-write");
}

/// FNV-1a of a generation's (or VM's) whole guest memory, read 1 MiB at a time.
fn digest(read: impl Fn(u64, &mut [u8]), bytes: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; MB as usize];
    for gpa in (0..bytes).step_by(MB as usize) {
        read(gpa, &mut buf);
        for w in buf.chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            h = (h ^ v).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Incremental layers (each later generation stacks only the pages written since the one
/// before on the previous generation's layers): for 40 generations, crossing the point where
/// a full layer starts a new stack, every image equals the parent's memory at its freeze,
/// byte for byte, and still does at the end, after the parent wrote on.
#[test]
fn every_incremental_generation_equals_the_parent_at_its_freeze() {
    generations_equal_the_parent(false);
}

/// The same with a parent whose first freeze re-points its slot: its tracker is made after it
/// runs on the view, so it finds written pages by scanning its page tables, not by record.
#[test]
fn every_scanned_incremental_generation_equals_the_parent_at_its_freeze() {
    generations_equal_the_parent(true);
}

fn generations_equal_the_parent(repoint: bool) {
    let mem = 64 * MB;
    let parent = boot(&format!("p-incr-{repoint}"), mem);
    parent.set_first_freeze_by_repoint(repoint);
    drop(parent.clone_children(1, &CloneOptions::default()).unwrap());
    // 16 MiB written once, before the first later freeze: in its layer only.
    ask(&parent, "bench-fault 4096");
    let mut kept = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut incremental = 0;
    for k in 0..40u64 {
        // The guest writes (allocations, a mapping written then unmapped) and the VMM writes
        // a few pages of the unused boot area, some of them again and again.
        assert_eq!(ask(&parent, "alloc 16"), "ok 16 136");
        ask(&parent, "bench-fault 64");
        for _ in 0..8 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let page = 0x50 + (seed >> 33) % 0x40;
            parent
                .write_phys(page << 12, &(k + 1).to_le_bytes())
                .unwrap();
        }
        parent.pause().unwrap();
        let g = parent.freeze().unwrap();
        let rep = *g.freeze_report();
        assert_eq!(rep.pages_copied, 0, "generation {k}: copied while paused");
        assert_eq!(
            rep.recorded, !repoint,
            "generation {k}: recorded, or scanned"
        );
        if !rep.full_layer {
            incremental += 1;
        }
        let want = digest(|gpa, b| parent.read_phys(gpa, b).unwrap(), mem);
        let got = digest(|gpa, b| g.read_phys(gpa, b).unwrap(), mem);
        assert_eq!(
            got, want,
            "generation {k} ({rep:?}) differs from its parent"
        );
        kept.push((g, want, rep));
        parent.resume().unwrap();
    }
    // The first later freeze takes every written page; then one layer per freeze, until a
    // full layer starts a new stack (32 layers, or more pages stacked than in the full one).
    let layers: Vec<u64> = kept.iter().map(|(_, _, r)| r.layers).collect();
    assert_eq!(layers[..3], [1, 2, 3], "{layers:?}");
    for (k, w) in layers.windows(2).enumerate() {
        let full = kept[k + 1].2.full_layer;
        assert_eq!(w[1], if full { 1 } else { w[0] + 1 }, "{layers:?}");
        assert!(w[0] <= 32, "{layers:?}");
    }
    let protected: Vec<u64> = kept.iter().map(|(_, _, r)| r.pages_protected).collect();
    println!("layers per generation {layers:?}, pages protected {protected:?}");
    assert!(kept[0].2.full_layer);
    assert!((30..40).contains(&incremental), "{layers:?}");
    // Incremental layers protect only what was written since the generation before.
    let firsts = kept[0].2.pages_protected;
    let later = kept[5].2.pages_protected;
    assert!(
        firsts > 4096 && later < 1024,
        "{later} pages protected vs {firsts} at the first"
    );
    ask(&parent, "alloc 64");
    for (k, (g, want, _)) in kept.iter().enumerate() {
        let got = digest(|gpa, b| g.read_phys(gpa, b).unwrap(), mem);
        assert_eq!(
            got, *want,
            "generation {k} changed after the parent wrote on"
        );
    }
    // A child of an old generation runs.
    let child = kept[10].0.spawn(1, &CloneOptions::default()).unwrap();
    assert_eq!(ask(&child.children[0], "alloc 8"), "ok 8 36");
}
