//! Linux KSM on the *live* memory of anon-memory clones (`CloneOptions::anon_memory`), under
//! real KVM with the real kscope kernel and `/bin/ktest`: identical pages of two clones are
//! merged copy-on-write while the clones keep answering requests correctly.

#[path = "clone_support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use kscope_vmm::dedup::Ksm;
use kscope_vmm::{CloneOptions, VmError};
use support::{ask, ask_bytes, boot};

const MB: u64 = 1 << 20;

/// Pages of this process merged by KSM (`/proc/self/ksm_merging_pages`, Linux 6.1+).
fn merging_pages() -> Option<u64> {
    std::fs::read_to_string("/proc/self/ksm_merging_pages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

#[test]
fn ksm_merges_live_anon_clones_and_they_stay_correct() {
    if !Path::new("/sys/kernel/mm/ksm/run").exists() {
        println!("SKIP: /sys/kernel/mm/ksm is absent (kernel without CONFIG_KSM)");
        return;
    }
    let parent = boot("p-ksm", 64 * MB);
    let exe = ask_bytes(&parent, "cat /bin/ktest");
    parent.pause().unwrap();
    let batch = parent
        .clone_children(
            2,
            &CloneOptions {
                anon_memory: true,
                ..Default::default()
            },
        )
        .expect("clone with anon memory");
    let (a, b) = (&batch.children[0], &batch.children[1]);
    parent.resume().unwrap();
    for c in [a, b] {
        assert_eq!(ask_bytes(c, "cat /bin/ktest"), exe, "{}", c.name());
        assert_eq!(ask(c, "alloc 64"), format!("ok 64 {}", 64 * 65 / 2));
        let st = c.memory_stats();
        assert!(st.lazy && st.footprint_bytes > 0, "{st:?}");
    }

    // Not mergeable: memfd-backed VMs; not freezable: anon-memory clones.
    assert!(matches!(
        parent.mark_mergeable(&[0]),
        Err(VmError::BadConfig(_))
    ));
    match a.clone_children(1, &CloneOptions::default()) {
        Err(VmError::BadConfig(m)) => assert!(m.contains("anon-memory"), "{m}"),
        other => panic!("cloning an anon-memory clone: {other:?}"),
    }

    let pages: Vec<u64> = (0..a.mem_bytes() / 4096).collect();
    assert_eq!(a.mark_mergeable(&pages).unwrap(), pages.len());
    assert_eq!(b.mark_mergeable(&pages).unwrap(), pages.len());
    let ksm = Ksm::open().expect("taking control of KSM");
    let before = ksm.counters().unwrap();
    let took = ksm
        .scan(4096, 3, Duration::from_secs(60))
        .expect("ksmd scans");
    let after = ksm.counters().unwrap();
    let mine = merging_pages();
    println!(
        "ksmd ran {took:?}: pages_sharing {} -> {}, pages_shared {} -> {}, this process's merged pages {mine:?}",
        before.pages_sharing, after.pages_sharing, before.pages_shared, after.pages_shared
    );
    match mine {
        Some(n) => assert!(n > 0, "KSM merged nothing of the clones"),
        None => assert!(after.pages_sharing > 0, "KSM merged nothing"),
    }
    assert!(after.pages_sharing > 0);

    // Copy-on-write keeps both clones correct: reads of merged pages and writes that break
    // the sharing.
    for c in [a, b] {
        assert_eq!(
            ask_bytes(c, "cat /bin/ktest"),
            exe,
            "{} after merging",
            c.name()
        );
        assert_eq!(ask(c, "alloc 256"), format!("ok 256 {}", 256 * 257 / 2));
        assert_eq!(
            ask(c, &format!("echo still {}", c.name())),
            format!("still {}", c.name())
        );
    }
    assert_eq!(ask(&parent, "echo parent"), "parent");
    drop(ksm);
    for c in &batch.children {
        c.stop().unwrap();
    }
}
