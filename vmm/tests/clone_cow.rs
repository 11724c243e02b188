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
