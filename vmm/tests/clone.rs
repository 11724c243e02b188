//! Live cloning under real KVM with the real kscope kernel and `/bin/ktest`.
//!
//! Memory equality is checked with paused children: the parent is paused, cloned with
//! `start_paused` children, and every page of the generation image, the parent and each child
//! is compared by CRC-32 before anything runs again (the GenPage differs by design and is
//! checked field by field).

#[path = "clone_support/mod.rs"]
mod support;

use std::time::Instant;

use kscope_guest::abi::boot::{GenPage, GENPAGE_MAGIC};
use kscope_guest::abi::from_bytes;
use kscope_guest::abi::layout::GENPAGE_GPA;
use kscope_guest::abi::request::kind;
use kscope_vmm::{CloneOptions, MemoryMode, Vm, VmState};
use support::{ask, ask_bytes, boot, T};

const MB: u64 = 1 << 20;

fn page_crc(read: impl Fn(u64, &mut [u8]), gpa: u64) -> u32 {
    let mut b = [0u8; 4096];
    read(gpa, &mut b);
    crc32fast::hash(&b)
}

fn genpage(vm: &Vm) -> GenPage {
    let mut b = [0u8; 4096];
    vm.read_phys(GENPAGE_GPA, &mut b).unwrap();
    from_bytes(&b).unwrap()
}

#[test]
fn a_lazy_clone_answers_requests() {
    let parent = boot("p-first", 64 * MB);
    let batch = parent
        .clone_children(1, &CloneOptions::default())
        .expect("clone");
    let child = &batch.children[0];
    println!(
        "pause {:?} latency {:?} freeze {:?}",
        batch.parent_pause, batch.clone_latency, batch.freeze
    );
    assert_eq!(ask(child, "echo from child"), "from child");
    assert_eq!(ask(&parent, "echo parent still"), "parent still");
    let st = child.memory_stats();
    assert!(st.lazy && st.faults > 0 && st.pages_fetched > 0, "{st:?}");
    assert!(st.footprint_bytes < 8 * MB, "lazy child footprint {st:?}");
    assert_eq!(child.state(), VmState::Running);
    assert!(child.generation().is_some() && parent.generation().is_none());
    assert!(child.serial_output().contains("clone generation"));
}

#[test]
fn clone_memory_equals_the_parent_at_the_clone_point() {
    let parent = boot("p-eq", 64 * MB);
    ask(&parent, "alloc 64");
    for mode in [MemoryMode::Lazy, MemoryMode::Eager] {
        parent.pause().unwrap();
        let batch = parent
            .clone_children(
                2,
                &CloneOptions {
                    memory: mode,
                    start_paused: true,
                    ..Default::default()
                },
            )
            .expect("clone");
        let gen = &batch.generation;
        let pages = parent.mem_bytes() / 4096;
        let mut differing = 0;
        for g in 0..pages {
            let gpa = g * 4096;
            let img = page_crc(|a, b| gen.read_phys(a, b).unwrap(), gpa);
            let par = page_crc(|a, b| parent.read_phys(a, b).unwrap(), gpa);
            assert_eq!(img, par, "{mode:?}: image and parent differ at page {g}");
            for c in &batch.children {
                let ch = page_crc(|a, b| c.read_phys(a, b).unwrap(), gpa);
                if gpa == GENPAGE_GPA {
                    differing += usize::from(ch != img);
                } else {
                    assert_eq!(ch, img, "{mode:?}: {} differs at page {g}", c.name());
                }
            }
        }
        assert_eq!(differing, 2, "each child has its own GenPage");
        let (a, b) = (genpage(&batch.children[0]), genpage(&batch.children[1]));
        assert_eq!((a.magic, b.magic), (GENPAGE_MAGIC, GENPAGE_MAGIC));
        assert_ne!(a.generation, b.generation);
        assert_ne!(a.clone_id, b.clone_id);
        assert_ne!(a.seed, b.seed);
        assert_ne!(a.identity.mac, b.identity.mac);
        assert_eq!(&a.identity.mac[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(a.identity.ipv4[..2], [10, 0]);
        parent.resume().unwrap();
        for c in &batch.children {
            c.resume().unwrap();
            assert_eq!(ask(c, "echo ok"), "ok");
        }
        if mode == MemoryMode::Lazy {
            let s = batch.children[0].memory_stats();
            println!("lazy child after a full read + echo: {s:?}");
        }
    }
}

#[test]
fn writes_are_isolated_in_every_direction() {
    let parent = boot("p-iso", 64 * MB);
    let scratch = parent.mem_bytes() - 4 * 4096;
    let mut before = [0u8; 16];
    parent.read_phys(scratch, &mut before).unwrap();
    parent.pause().unwrap();
    let batch = parent
        .clone_children(
            2,
            &CloneOptions {
                start_paused: true,
                ..Default::default()
            },
        )
        .unwrap();
    let (a, b) = (&batch.children[0], &batch.children[1]);
    let read = |vm: &Vm| {
        let mut x = [0u8; 16];
        vm.read_phys(scratch, &mut x).unwrap();
        x
    };
    parent.write_phys(scratch, b"parent-wrote-it!").unwrap();
    assert_eq!(read(a), before, "parent write reached a child");
    assert_eq!(read(b), before);
    a.write_phys(scratch, b"child-a-wrote-it").unwrap();
    assert_eq!(
        read(&parent),
        *b"parent-wrote-it!",
        "child write reached the parent"
    );
    assert_eq!(read(b), before, "child write reached a sibling");
    let mut img = [0u8; 16];
    batch.generation.read_phys(scratch, &mut img).unwrap();
    assert_eq!(img, before, "a write reached the generation image");
    // A second generation sees the parent's write, the first children still do not.
    let batch2 = parent
        .clone_children(
            1,
            &CloneOptions {
                start_paused: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(read(&batch2.children[0]), *b"parent-wrote-it!");
    assert_eq!(read(b), before);
    println!("second freeze: {:?}", batch2.freeze);
    // Guest-level writes: each VM allocates and writes memory; all keep working.
    parent.resume().unwrap();
    for c in [a, b, &batch2.children[0]] {
        c.resume().unwrap();
    }
    for vm in [&parent, a, b, &batch2.children[0]] {
        assert_eq!(ask(vm, "alloc 32"), "ok 32 528");
    }
    assert_eq!(read(a), *b"child-a-wrote-it");
    assert_eq!(read(b), before);
}

#[test]
fn children_survive_their_parent() {
    let parent = boot("p-gone", 64 * MB);
    let batch = parent.clone_children(2, &CloneOptions::default()).unwrap();
    let gen = batch.generation.clone();
    drop(parent);
    drop(batch.generation);
    let before: Vec<u64> = batch
        .children
        .iter()
        .map(|c| c.memory_stats().faults)
        .collect();
    for c in &batch.children {
        assert_eq!(ask(c, "alloc 100"), "ok 100 5050");
        let bin = ask_bytes(c, "cat /bin/ktest");
        assert!(bin.starts_with(b"\x7fELF"), "cat /bin/ktest");
        assert_eq!(ask(c, "echo alive"), "alive");
    }
    for (c, b) in batch.children.iter().zip(before) {
        let after = c.memory_stats().faults;
        assert!(
            after > b,
            "{} took no faults after the parent died",
            c.name()
        );
    }
    assert!(std::sync::Arc::strong_count(&gen) >= 2);
}

#[test]
fn thirty_two_clones_answer_concurrently() {
    let parent = boot("p-32", 64 * MB);
    let t0 = Instant::now();
    let batch = parent.clone_children(32, &CloneOptions::default()).unwrap();
    let created = t0.elapsed();
    // Children are created in parallel; the batch still comes back in index order.
    for (i, c) in batch.children.iter().enumerate() {
        assert_eq!(c.name(), format!("p-32-c{i}"));
    }
    assert_eq!(batch.clone_latency.len(), 32);
    assert_eq!(batch.create_time.len(), 32);
    let pending: Vec<_> = batch
        .children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                i,
                c.submit(kind::WORKLOAD, format!("echo child {i}").as_bytes())
                    .unwrap(),
            )
        })
        .collect();
    for (i, p) in pending {
        let r = p
            .wait(T)
            .unwrap_or_else(|e| panic!("child {i}: {e}\n{}", batch.children[i].serial_output()));
        assert_eq!(r.payload, format!("child {i}").as_bytes());
    }
    let faults: u64 = batch.children.iter().map(|c| c.memory_stats().faults).sum();
    let foot: u64 = batch
        .children
        .iter()
        .map(|c| c.memory_stats().footprint_bytes)
        .sum();
    println!(
        "32 clones: created in {created:?} (pause {:?}), all answered after {:?}; {faults} faults, footprint {} KiB total",
        batch.parent_pause,
        t0.elapsed(),
        foot / 1024
    );
}

#[test]
fn two_clones_draw_different_random_streams() {
    let parent = boot("p-rng", 64 * MB);
    let p1 = ask_bytes(&parent, "random");
    let batch = parent.clone_children(2, &CloneOptions::default()).unwrap();
    let (a, b) = (&batch.children[0], &batch.children[1]);
    let ra = ask_bytes(a, "random");
    let rb = ask_bytes(b, "random");
    let rp = ask_bytes(&parent, "random");
    assert_eq!(ra.len(), 32);
    assert_ne!(ra, rb, "two clones drew the same random bytes");
    assert_ne!(ra, rp);
    assert_ne!(rp, p1);
    let sa = ask(a, "sigclone");
    let ga = genpage(a).generation;
    assert_eq!(
        sa,
        format!("1 {ga}"),
        "ktest saw SIGCLONE with its generation"
    );
    assert_eq!(ask(&parent, "sigclone"), "0 0");
}

/// The first freeze moves the parent onto a standby KVM VM (made ahead or on the call) or, as
/// the baseline, re-points its slot: either way the parent keeps running with its devices,
/// request path and counters, a request queued across the freeze is answered, the image holds
/// the parent's memory at the freeze and nothing written after it, and the parent's later
/// freezes capture copy-on-write.
#[test]
fn first_freeze_moves_the_parent_onto_a_standby_vm() {
    let marker = 0x60000;
    for (name, repoint, ahead) in [
        ("p-standby", false, true),
        ("p-standby-call", false, false),
        ("p-repoint", true, false),
    ] {
        let parent = boot(name, 64 * MB);
        ask(&parent, "alloc 256");
        parent.set_first_freeze_by_repoint(repoint);
        if ahead {
            parent.prepare_freeze().unwrap();
            parent.prepare_freeze().unwrap();
        }
        parent.write_phys(marker, b"before").unwrap();
        let exits = parent.exit_counts();
        let pending = parent.submit(kind::WORKLOAD, b"echo across").unwrap();
        let batch = parent.clone_children(1, &CloneOptions::default()).unwrap();
        let f = batch.freeze;
        assert!(f.first && f.rehomed != repoint, "{name}: {f:?}");
        assert_eq!(f.prepare.is_zero(), ahead || repoint, "{name}: {f:?}");
        assert_eq!(pending.wait(T).unwrap().payload, b"across");
        parent.write_phys(marker, b"after!").unwrap();
        let r = ask(&parent, "alloc 256");
        assert!(r.starts_with("ok"), "{name}: {r}");
        assert_eq!(parent.state(), VmState::Running, "{name}");
        assert!(parent.exit_counts().io >= exits.io, "{name}: counters kept");
        let mut b = [0u8; 6];
        batch.generation.read_phys(marker, &mut b).unwrap();
        assert_eq!(&b, b"before", "{name}: image");
        let child = &batch.children[0];
        child.read_phys(marker, &mut b).unwrap();
        assert_eq!(&b, b"before", "{name}: child");
        parent.read_phys(marker, &mut b).unwrap();
        assert_eq!(&b, b"after!", "{name}: parent");
        assert_eq!(ask(child, "echo c"), "c");
        // A later freeze: copy-on-write capture of what the parent wrote since.
        let later = parent.clone_children(1, &CloneOptions::default()).unwrap();
        assert!(
            !later.freeze.first && later.freeze.pages_protected > 0,
            "{name}: {:?}",
            later.freeze
        );
        assert_eq!(later.freeze.pages_copied, 0, "{name}");
        later.children[0].read_phys(marker, &mut b).unwrap();
        assert_eq!(&b, b"after!", "{name}: later child");
        assert_eq!(ask(&later.children[0], "echo l"), "l");
        assert_eq!(ask(&parent, "echo p"), "p");
        parent.prepare_freeze().unwrap();
        drop(later);
        drop(batch);
        parent.stop().unwrap();
    }
}
