//! Clones made from a pool of pre-created VM shells (`kscope_vmm::pool`), under real KVM with
//! the real kscope kernel and `/bin/ktest`: 64 concurrent pooled clones are each correct, an
//! exhausted (or empty, or mismatched) pool takes the direct path without waiting. The 64 are
//! started together (`CloneOptions::start_together`, as the service does).

#[path = "clone_support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::boot::GenPage;
use kscope_guest::abi::from_bytes;
use kscope_guest::abi::layout::GENPAGE_GPA;
use kscope_guest::abi::request::kind;
use kscope_vmm::pool::{ShellKey, ShellPool};
use kscope_vmm::{CloneBatch, CloneOptions, Vm};
use support::{ask, ask_bytes, boot, T};

const MB: u64 = 1 << 20;

fn key_of(vm: &Vm) -> ShellKey {
    ShellKey {
        mem_bytes: vm.mem_bytes(),
        vcpus: vm.config().vcpus,
    }
}

fn genpage(vm: &Vm) -> GenPage {
    let mut b = [0u8; 4096];
    vm.read_phys(GENPAGE_GPA, &mut b).unwrap();
    from_bytes(&b).unwrap()
}

fn pooled(pool: &Arc<ShellPool>) -> CloneOptions {
    CloneOptions {
        pool: Some(pool.clone()),
        ..CloneOptions::default()
    }
}

/// Every child answers its own checked request (all in flight at once), and every child has
/// its own clone id, MAC, IP and random stream, and saw SIGCLONE for its generation (the
/// `sigclones`-th time: a clone of a clone saw its parent's too).
fn check_children_n(batch: &CloneBatch, sigclones: u32) {
    let pending: Vec<_> = batch
        .children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = c
                .submit(kind::WORKLOAD, format!("echo child {i}").as_bytes())
                .unwrap();
            (i, p)
        })
        .collect();
    for (i, p) in pending {
        let r = p
            .wait(T)
            .unwrap_or_else(|e| panic!("child {i}: {e}\n{}", batch.children[i].serial_output()));
        assert_eq!(r.payload, format!("child {i}").as_bytes(), "child {i}");
    }
    let mut ids = HashSet::new();
    let mut macs = HashSet::new();
    let mut ips = HashSet::new();
    let mut randoms = HashSet::new();
    for c in &batch.children {
        let g = genpage(c);
        assert!(ids.insert(g.clone_id), "clone id {} twice", g.clone_id);
        assert!(
            macs.insert(g.identity.mac),
            "MAC {:?} twice",
            g.identity.mac
        );
        assert!(
            ips.insert(g.identity.ipv4),
            "IP {:?} twice",
            g.identity.ipv4
        );
        assert_eq!(Some(g.clone_id), c.clone_id());
        assert_eq!(c.identity().map(|i| i.mac), Some(g.identity.mac));
        let r = ask_bytes(c, "random");
        assert_eq!(r.len(), 32);
        assert!(
            randoms.insert(r),
            "{}: same random bytes as a sibling",
            c.name()
        );
        assert_eq!(ask(c, "sigclone"), format!("{sigclones} {}", g.generation));
    }
}

fn check_children(batch: &CloneBatch) {
    check_children_n(batch, 1)
}

#[test]
fn sixty_four_pooled_clones_are_each_correct() {
    let parent = boot("p-pool64", 64 * MB);
    let pool = Arc::new(ShellPool::new(64).unwrap());
    pool.prepare(key_of(&parent));
    let ready = pool.wait_ready(key_of(&parent), 64, Duration::from_secs(120));
    assert_eq!(
        ready,
        64,
        "pool filled: {:?} {:?}",
        pool.stats(),
        pool.last_error()
    );
    let t0 = Instant::now();
    let opts = CloneOptions {
        start_together: true,
        ..pooled(&pool)
    };
    let batch = parent.clone_children(64, &opts).unwrap();
    let created = t0.elapsed();
    let st = pool.stats();
    assert_eq!(st.hits, 64, "{st:?}");
    assert_eq!(st.misses, 0, "{st:?}");
    assert!(batch.breakdown.iter().all(|b| b.pooled));
    assert!(batch.breakdown.iter().all(|b| b.memory_slot.is_zero()));
    for (i, c) in batch.children.iter().enumerate() {
        assert_eq!(c.name(), format!("p-pool64-c{i}"));
    }
    check_children(&batch);
    // Writes stay in the child that made them.
    ask(&batch.children[0], "alloc 4");
    assert_eq!(ask(&batch.children[1], "echo sibling"), "sibling");
    assert_eq!(ask(&parent, "echo parent"), "parent");
    println!(
        "64 pooled clones created in {created:?}, slowest first instruction {:?}; {:?}",
        batch.clone_latency.iter().max(),
        pool.stats()
    );
}

#[test]
fn an_exhausted_pool_takes_the_direct_path_without_waiting() {
    let parent = boot("p-pool-ex", 64 * MB);
    let key = key_of(&parent);
    let pool = Arc::new(ShellPool::new(2).unwrap());
    pool.prepare(key);
    assert_eq!(pool.wait_ready(key, 2, Duration::from_secs(60)), 2);
    // Nothing is refilled during the call: exactly 2 children find a shell.
    pool.hold_refill(true);
    let t0 = Instant::now();
    let batch = parent.clone_children(8, &pooled(&pool)).unwrap();
    let took = t0.elapsed();
    let st = pool.stats();
    assert_eq!((st.hits, st.misses, st.ready), (2, 6, 0), "{st:?}");
    assert_eq!(batch.breakdown.iter().filter(|b| b.pooled).count(), 2);
    assert!(took < Duration::from_secs(20), "8 clones took {took:?}");
    check_children(&batch);
    // An empty pool answers at once, every time.
    let t1 = Instant::now();
    let more = parent.clone_children(2, &pooled(&pool)).unwrap();
    assert!(t1.elapsed() < Duration::from_secs(10));
    assert_eq!(pool.stats().misses, 8);
    check_children(&more);
    // The pool refills once released.
    pool.hold_refill(false);
    assert_eq!(pool.wait_ready(key, 2, Duration::from_secs(60)), 2);
    println!("8 clones from a pool of 2 in {took:?}: {st:?}");
}

#[test]
fn an_empty_or_mismatched_pool_is_a_miss() {
    let parent = boot("p-pool-miss", 64 * MB);
    // No shells at all.
    let none = Arc::new(ShellPool::new(0).unwrap());
    let batch = parent.clone_children(2, &pooled(&none)).unwrap();
    assert_eq!(none.stats().misses, 2);
    assert!(batch.breakdown.iter().all(|b| !b.pooled));
    check_children(&batch);
    // Shells of another size never serve this parent.
    let other = Arc::new(ShellPool::new(2).unwrap());
    let big = ShellKey {
        mem_bytes: 128 * MB,
        vcpus: 1,
    };
    other.prepare(big);
    assert_eq!(other.wait_ready(big, 2, Duration::from_secs(60)), 2);
    let batch = parent.clone_children(1, &pooled(&other)).unwrap();
    assert_eq!(other.stats().hits, 0);
    assert_eq!(other.stats().misses, 1);
    check_children(&batch);
    // ... and the pool now refills for the key asked for, within its capacity.
    let key = key_of(&parent);
    assert_eq!(other.wait_ready(key, 2, Duration::from_secs(60)), 2);
    assert!(other.stats().ready <= 2, "{:?}", other.stats());
}

#[test]
fn shells_of_a_key_no_longer_wanted_are_evicted_within_the_capacity() {
    let pool = ShellPool::new(2).unwrap();
    let (a, b) = (
        ShellKey {
            mem_bytes: 64 * MB,
            vcpus: 1,
        },
        ShellKey {
            mem_bytes: 32 * MB,
            vcpus: 1,
        },
    );
    pool.prepare(a);
    assert_eq!(pool.wait_ready(a, 2, Duration::from_secs(60)), 2);
    pool.prepare(b);
    assert_eq!(pool.wait_ready(b, 2, Duration::from_secs(60)), 2);
    let st = pool.stats();
    assert_eq!((st.ready, st.evicted), (2, 2), "{st:?}");
    assert!(pool.take(a).is_none(), "a's shells were evicted");
    assert!(pool.take(b).is_some());
}

#[test]
fn a_pooled_clone_can_be_cloned_again_from_the_pool() {
    let parent = boot("p-pool-cc", 64 * MB);
    let pool = Arc::new(ShellPool::new(4).unwrap());
    let key = key_of(&parent);
    pool.prepare(key);
    assert_eq!(pool.wait_ready(key, 4, Duration::from_secs(60)), 4);
    let first = parent.clone_children(1, &pooled(&pool)).unwrap();
    let child = &first.children[0];
    assert_eq!(ask(child, "echo child"), "child");
    assert_eq!(pool.wait_ready(key, 4, Duration::from_secs(60)), 4);
    let second = child.clone_children(2, &pooled(&pool)).unwrap();
    assert!(second.breakdown.iter().all(|b| b.pooled));
    check_children_n(&second, 2);
    assert_eq!(ask(child, "echo still"), "still");
    assert_eq!(pool.stats().hits, 3);
}
