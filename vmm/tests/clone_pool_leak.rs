//! A pool of pre-created VM shells leaks nothing: while it lives its shells hold descriptors
//! and waiting threads, and it has a refill thread; once it and its clones are dropped, the process has the same
//! descriptors and threads as before. Alone in its test binary (its own process) because it
//! counts process-wide resources.

#[path = "clone_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use kscope_vmm::pool::{ShellKey, ShellPool};
use kscope_vmm::CloneOptions;
use support::{ask, boot, count_proc};

const MB: u64 = 1 << 20;

#[test]
fn a_dropped_pool_leaks_no_threads_or_descriptors() {
    let parent = boot("p-pool-leak", 64 * MB);
    let key = ShellKey {
        mem_bytes: parent.mem_bytes(),
        vcpus: parent.config().vcpus,
    };
    // Two clones first, so that lazily made things exist: process-wide ones (KVM handle, ...)
    // and the parent's (its copy-on-write handler thread and the memfd of its latest layers,
    // made by its first later freeze and kept while it lives).
    for _ in 0..2 {
        drop(parent.clone_children(1, &CloneOptions::default()).unwrap());
    }
    std::thread::sleep(Duration::from_millis(100));
    let (fds, tasks) = (count_proc("fd"), count_proc("task"));
    for round in 0..5 {
        let pool = Arc::new(ShellPool::new(8).unwrap());
        pool.prepare(key);
        assert_eq!(pool.wait_ready(key, 8, Duration::from_secs(60)), 8);
        let (fds_full, tasks_full) = (count_proc("fd"), count_proc("task"));
        // Each shell: VM, vCPU, memfd, userfaultfd, and 2 waiting threads (fault handler,
        // vCPU); plus the refill thread.
        assert!(fds_full >= fds + 8 * 4, "{fds} -> {fds_full} with 8 shells");
        assert_eq!(
            tasks_full,
            tasks + 1 + 8 * 2,
            "the refill thread and the shells'"
        );
        let opts = CloneOptions {
            pool: Some(pool.clone()),
            ..CloneOptions::default()
        };
        let batch = parent.clone_children(4, &opts).unwrap();
        for (i, c) in batch.children.iter().enumerate() {
            assert_eq!(ask(c, &format!("echo {round} {i}")), format!("{round} {i}"));
        }
        assert_eq!(pool.stats().hits, 4);
        drop(batch);
        drop(opts);
        // Dropped while the refill thread may be making shells.
        drop(pool);
        std::thread::sleep(Duration::from_millis(100));
        let (fds2, tasks2) = (count_proc("fd"), count_proc("task"));
        assert_eq!(fds2, fds, "round {round}: descriptors leaked");
        assert_eq!(tasks2, tasks, "round {round}: threads leaked");
    }
    assert_eq!(ask(&parent, "echo still"), "still");
}
