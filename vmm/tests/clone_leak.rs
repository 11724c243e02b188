//! 200 clone/destroy cycles leak no file descriptors, threads or memory. Alone in its test
//! binary (its own process) because it counts process-wide resources.

#[path = "clone_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kscope_vmm::CloneOptions;
use support::{ask, boot, count_proc, rss_kib};

const MB: u64 = 1 << 20;

#[test]
fn two_hundred_clone_cycles_leak_nothing() {
    let parent = boot("p-leak", 64 * MB);
    let cycle = |i: usize| {
        let batch = parent.clone_children(1, &CloneOptions::default()).unwrap();
        assert_eq!(ask(&batch.children[0], &format!("echo {i}")), i.to_string());
    };
    for i in 0..10 {
        cycle(i);
    }
    let (fds, tasks, rss) = (count_proc("fd"), count_proc("task"), rss_kib());
    let t0 = Instant::now();
    for i in 0..200 {
        cycle(i);
    }
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let (fds2, tasks2, rss2) = (count_proc("fd"), count_proc("task"), rss_kib());
    println!(
        "200 cycles in {took:?}: fds {fds}->{fds2}, threads {tasks}->{tasks2}, RSS {rss}->{rss2} KiB"
    );
    assert_eq!(fds2, fds, "file descriptors leaked");
    assert_eq!(tasks2, tasks, "threads leaked");
    assert!(rss2 < rss + 32 * 1024, "RSS grew from {rss} to {rss2} KiB");
    assert_eq!(ask(&parent, "echo still"), "still");
}
