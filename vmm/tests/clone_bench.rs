//! Clone and snapshot measurements (ignored by default). Run with
//! `cargo test -p kscope-vmm --test clone_bench -- --ignored --nocapture --test-threads 1`.

#[path = "clone_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use kscope_vmm::{CloneOptions, MemoryMode, Vm};
use support::{ask, boot};

const MB: u64 = 1 << 20;

/// Touch about `frac` of guest RAM from inside the guest (ktest `alloc`, in chunks).
fn populate(vm: &Vm, frac: f64) {
    let pages = (vm.mem_bytes() as f64 * frac / 4096.0) as u64;
    let chunk = pages.min(16384);
    let mut done = 0;
    while done < pages {
        let r = ask(vm, &format!("alloc {chunk}"));
        assert!(r.starts_with("ok"), "{r}");
        done += chunk;
    }
}

/// Sizes in MiB from `KSCOPE_BENCH_SIZES` (comma separated) or `default`.
fn sizes(default: &[u64]) -> Vec<u64> {
    std::env::var("KSCOPE_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Fraction of RAM the guest touches before cloning (`KSCOPE_BENCH_FILL`, default 0.5).
fn fill() -> f64 {
    std::env::var("KSCOPE_BENCH_FILL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[test]
#[ignore]
fn bench_pause_and_latency_by_memory_size() {
    println!("| RAM | populated | 1st pause (us) | stop/capture/mem (us) | 1st clone latency (us) | create (us) | 2nd pause (us) | 2nd dirty pages | 2nd latency (us) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for mb in sizes(&[64, 256, 1024, 2048]) {
        let vm = boot(&format!("b{mb}"), mb * MB);
        populate(&vm, fill());
        let footprint = vm.memory_stats().footprint_bytes;
        let b1 = vm.clone_children(1, &CloneOptions::default()).unwrap();
        assert_eq!(ask(&b1.children[0], "echo x"), "x");
        // The parent dirties some memory, then is cloned again (a layered generation).
        populate(&vm, 0.05);
        let b2 = vm.clone_children(1, &CloneOptions::default()).unwrap();
        assert_eq!(ask(&b2.children[0], "echo y"), "y");
        let f = &b1.freeze;
        println!(
            "| {mb} MiB | {} MiB | {:.0} | {:.0}/{:.0}/{:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} |",
            footprint >> 20,
            us(b1.parent_pause),
            us(f.stop_vcpus),
            us(f.capture),
            us(f.memory),
            us(b1.clone_latency[0]),
            us(b1.create_time[0]),
            us(b2.parent_pause),
            b2.freeze.pages_copied,
            us(b2.clone_latency[0]),
        );
        println!(
            "  first freeze {:?}\n  second freeze {:?}",
            b1.freeze, b2.freeze
        );
    }
}

/// The later pause with copy-on-write capture against the copy-while-paused baseline, in the
/// same run and on the same parent: the parent dirties `KSCOPE_BENCH_DIRTY` of its RAM
/// (default 0.05) before each later clone; the two methods alternate, 3 times each.
#[test]
#[ignore]
fn bench_later_pause_copy_vs_cow() {
    let dirty = std::env::var("KSCOPE_BENCH_DIRTY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.05);
    println!("| RAM | populated | dirty pages | later pause, copy (ms) | later pause, copy-on-write (ms) | ratio |");
    println!("|---|---|---|---|---|---|");
    for mb in sizes(&[256, 1024, 4096]) {
        let vm = boot(&format!("bcow{mb}"), mb * MB);
        populate(&vm, fill());
        let footprint = vm.memory_stats().footprint_bytes;
        drop(vm.clone_children(1, &CloneOptions::default()).unwrap());
        let (mut copy, mut cow, mut pages) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            for by_copy in [true, false] {
                vm.set_capture_by_copy(by_copy);
                populate(&vm, dirty);
                let b = vm.clone_children(1, &CloneOptions::default()).unwrap();
                assert_eq!(ask(&b.children[0], "echo c"), "c");
                let f = &b.freeze;
                if by_copy {
                    assert!(f.pages_copied > 0 && f.pages_protected == 0, "{f:?}");
                    copy.push(b.parent_pause.as_secs_f64() * 1e3);
                    pages.push(f.pages_copied);
                } else {
                    assert!(f.pages_copied == 0 && f.pages_protected > 0, "{f:?}");
                    cow.push(b.parent_pause.as_secs_f64() * 1e3);
                }
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[1], v[0], v[2])
        };
        let ((c, c0, c1), (w, w0, w1)) = (med(&mut copy), med(&mut cow));
        pages.sort();
        println!(
            "| {mb} MiB | {} MiB | {} | {c:.2} ({c0:.2}-{c1:.2}) | {w:.2} ({w0:.2}-{w1:.2}) | {:.3} |",
            footprint >> 20,
            pages[1],
            w / c
        );
        vm.stop().unwrap();
    }
}

/// Later pauses with recorded incremental layers (the pages written since the previous freeze,
/// recorded by the copy-on-write handler: no scan) against full layers found by a scan (all
/// pages written since the first freeze, the method before), in the same run: per size, two
/// parents (the second with `Vm::set_full_layers`) touch `KSCOPE_BENCH_FILL` of their RAM, are
/// cloned, dirty 5% of it, are cloned again (their first later freeze), then per round
/// allocate 180 pages and are cloned, alternating, 5 times each.
#[test]
#[ignore]
fn bench_later_pause_incremental_vs_full() {
    println!("| RAM | first later layer (pages) | method | pause (ms) | stop / capture / memory (ms) | pages in the layer |");
    println!("|---|---|---|---|---|---|");
    for mb in sizes(&[256, 1024, 4096]) {
        let vms: Vec<Vm> = [false, true]
            .into_iter()
            .map(|full| {
                let vm = boot(&format!("binc{mb}-{full}"), mb * MB);
                vm.set_full_layers(full);
                populate(&vm, fill());
                drop(vm.clone_children(1, &CloneOptions::default()).unwrap());
                populate(&vm, 0.05);
                drop(vm.clone_children(1, &CloneOptions::default()).unwrap());
                vm
            })
            .collect();
        let mut rows: [Vec<[f64; 5]>; 2] = Default::default();
        let mut first = [0u64; 2];
        for _ in 0..5 {
            for (i, vm) in vms.iter().enumerate() {
                assert!(ask(vm, "alloc 180").starts_with("ok"));
                let b = vm.clone_children(1, &CloneOptions::default()).unwrap();
                assert_eq!(ask(&b.children[0], "echo i"), "i");
                let f = &b.freeze;
                let full = i == 1;
                assert_eq!((f.full_layer, f.recorded), (full, !full), "{f:?}");
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                rows[i].push([
                    ms(b.parent_pause),
                    ms(f.stop_vcpus),
                    ms(f.capture),
                    ms(f.memory),
                    f.pages_protected as f64,
                ]);
                first[i] = first[i].max(f.pages_protected);
            }
        }
        for (i, name) in ["recorded, incremental", "scanned, full (before)"]
            .into_iter()
            .enumerate()
        {
            let med = |k: usize| {
                let mut v: Vec<f64> = rows[i].iter().map(|r| r[k]).collect();
                v.sort_by(f64::total_cmp);
                (v[2], v[0], v[4])
            };
            let (p, p0, p1) = med(0);
            println!(
                "| {mb} MiB | {} | {name} | {p:.2} ({p0:.2}-{p1:.2}) | {:.2} / {:.2} / {:.2} | {:.0} |",
                first[1],
                med(1).0,
                med(2).0,
                med(3).0,
                med(4).0
            );
        }
        for vm in vms {
            vm.stop().unwrap();
        }
    }
}

/// The first pause with the parent moved onto a standby VM (made ahead with
/// `Vm::prepare_freeze`) against the slot re-point baseline, in the same run: per size, 3 fresh
/// parents per method, alternating; each touches `KSCOPE_BENCH_FILL` of its RAM first.
#[test]
#[ignore]
fn bench_first_pause_standby_vs_repoint() {
    println!("| RAM | populated | method | first pause (ms) | stop/capture/memory (ms) | parent's next answer (ms) | clone call -> first instr. (ms) |");
    println!("|---|---|---|---|---|---|---|");
    for mb in sizes(&[64, 256, 1024, 4096]) {
        let mut pauses: [Vec<f64>; 2] = Default::default();
        for rep in 0..3 {
            for (m, repoint) in [false, true].into_iter().enumerate() {
                let vm = boot(&format!("bfirst{mb}-{rep}-{m}"), mb * MB);
                populate(&vm, fill());
                let footprint = vm.memory_stats().footprint_bytes;
                vm.set_first_freeze_by_repoint(repoint);
                vm.prepare_freeze().unwrap();
                let b = vm.clone_children(1, &CloneOptions::default()).unwrap();
                let t = Instant::now();
                assert_eq!(ask(&vm, "echo p"), "p");
                let next = t.elapsed();
                assert_eq!(ask(&b.children[0], "echo c"), "c");
                let f = &b.freeze;
                assert!(f.first && f.rehomed != repoint, "{f:?}");
                assert_eq!(f.prepare, Duration::ZERO, "{f:?}");
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                pauses[m].push(ms(b.parent_pause));
                println!(
                    "| {mb} MiB | {} MiB | {} | {:.2} | {:.2}/{:.2}/{:.2} | {:.2} | {:.2} |",
                    footprint >> 20,
                    if repoint {
                        "slot re-point"
                    } else {
                        "standby VM"
                    },
                    ms(b.parent_pause),
                    ms(f.stop_vcpus),
                    ms(f.capture),
                    ms(f.memory),
                    ms(next),
                    ms(b.clone_latency[0]),
                );
                drop(b);
                vm.stop().unwrap();
            }
        }
        for v in &mut pauses {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "  {mb} MiB median first pause: standby {:.2} ms, re-point {:.2} ms, ratio {:.3}",
            pauses[0][1],
            pauses[1][1],
            pauses[0][1] / pauses[1][1]
        );
    }
}

#[test]
#[ignore]
fn bench_batch_creation() {
    let vm = boot("bbatch", 256 * MB);
    populate(&vm, fill() / 2.0);
    println!("| clones | parent pause (us) | total (ms) | per clone create mean (us) | last clone latency (ms) | all answered (ms) |");
    println!("|---|---|---|---|---|---|");
    for n in [1usize, 8, 32] {
        let t0 = Instant::now();
        let b = vm.clone_children(n, &CloneOptions::default()).unwrap();
        let pend: Vec<_> = b
            .children
            .iter()
            .map(|c| {
                c.submit(kscope_guest::abi::request::kind::WORKLOAD, b"echo z")
                    .unwrap()
            })
            .collect();
        for p in pend {
            assert_eq!(p.wait(support::T).unwrap().payload, b"z");
        }
        let answered = t0.elapsed();
        let mean = b.create_time.iter().sum::<Duration>() / n as u32;
        println!(
            "| {n} | {:.0} | {:.1} | {:.0} | {:.2} | {:.1} |",
            us(b.parent_pause),
            b.total.as_secs_f64() * 1e3,
            us(mean),
            b.clone_latency.last().unwrap().as_secs_f64() * 1e3,
            answered.as_secs_f64() * 1e3
        );
    }
}

#[test]
#[ignore]
fn bench_lazy_vs_eager() {
    println!("| RAM | mode | call->first response (ms) | clone latency (ms) | faults | fetched | zero-filled | fault p50/p99 (us) | footprint (KiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for mb in sizes(&[256, 1024]) {
        let vm = boot(&format!("ble{mb}"), mb * MB);
        populate(&vm, fill());
        for mode in [MemoryMode::Lazy, MemoryMode::Eager] {
            let t0 = Instant::now();
            let b = vm
                .clone_children(
                    1,
                    &CloneOptions {
                        memory: mode,
                        ..Default::default()
                    },
                )
                .unwrap();
            let c = &b.children[0];
            assert_eq!(ask(c, "echo hi"), "hi");
            let first = t0.elapsed();
            // A few more requests touching memory.
            ask(c, "alloc 256");
            ask(c, "cat /bin/ktest");
            let s = c.memory_stats();
            println!(
                "| {mb} MiB | {mode:?} | {:.2} | {:.2} | {} | {} | {} | {:.1}/{:.1} | {} |",
                first.as_secs_f64() * 1e3,
                b.clone_latency[0].as_secs_f64() * 1e3,
                s.faults,
                s.pages_fetched,
                s.zero_filled,
                us(s.fault_p50),
                us(s.fault_p99),
                s.footprint_bytes / 1024
            );
        }
    }
}

#[test]
#[ignore]
fn bench_snapshot() {
    for mb in sizes(&[256, 1024]) {
        let vm = boot(&format!("bsnap{mb}"), mb * MB);
        populate(&vm, fill());
        let dir = std::env::temp_dir().join(format!("kscope-bench-snap-{}", std::process::id()));
        let rep = vm.snapshot(&dir).unwrap();
        drop(vm);
        for mode in [MemoryMode::Lazy, MemoryMode::Eager] {
            let t0 = Instant::now();
            let r = Vm::restore(&dir, mode, "bsr").unwrap();
            assert_eq!(ask(&r, "echo r"), "r");
            println!(
                "{mb} MiB: snapshot pause {:?} write {:?} ({} data pages); {mode:?} restore to first response {:?}, footprint {} KiB",
                rep.pause,
                rep.total,
                rep.memory.data_pages,
                t0.elapsed(),
                r.memory_stats().footprint_bytes / 1024
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
#[ignore]
fn bench_child_setup_pieces() {
    use kscope_vmm::lazy::{LazyRegion, RegionKind};
    for mb in sizes(&[64, 2048]) {
        let pages = mb * MB / 4096;
        let t0 = Instant::now();
        let region = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
        let t_region = t0.elapsed();
        let t1 = Instant::now();
        let hv = kscope_vmm::hypervisor::host().create_vm().unwrap();
        let t_vm = t1.elapsed();
        let t2 = Instant::now();
        // SAFETY: the region outlives the VM (dropped after it, below).
        unsafe {
            hv.set_memory_slot(0, 0, mb * MB, region.host_addr() as *mut u8)
                .unwrap()
        };
        let t_slot = t2.elapsed();
        drop(hv);
        println!("{mb} MiB: region {t_region:?}, create VM {t_vm:?}, memory slot {t_slot:?}");
    }
}

/// The parent's cost of writing fresh pages after its first freeze, recording vs scanning
/// (`Vm::set_full_layers`): ktest `bench-fault 256` (ns per page), before and after the
/// first freeze, and after a later one.
#[test]
#[ignore]
fn bench_parent_writes_after_freeze() {
    for mb in sizes(&[256, 4096]) {
        for full in [false, true] {
            let vm = boot(&format!("bw{mb}-{full}"), mb * MB);
            vm.set_full_layers(full);
            populate(&vm, fill());
            let before = ask(&vm, "bench-fault 256");
            drop(vm.clone_children(1, &CloneOptions::default()).unwrap());
            let t = Instant::now();
            let after = ask(&vm, "bench-fault 256");
            let took = t.elapsed();
            drop(vm.clone_children(1, &CloneOptions::default()).unwrap());
            let later = ask(&vm, "bench-fault 256");
            println!(
                "{mb} MiB, full layers {full}: ns per fresh page written: before {before}, \
                 after the first freeze {after} ({took:?} for the request), after a later {later}"
            );
            vm.stop().unwrap();
        }
    }
}

/// The first and a later pause of parents whose standby protects its whole view and records
/// writes (the default) against parents whose standby does not (`Vm::set_full_layers`): 3
/// fresh parents per method and size, alternating; each touches `KSCOPE_BENCH_FILL` of its
/// RAM, makes its standby ahead, is cloned, allocates 180 pages and is cloned again.
#[test]
#[ignore]
fn bench_pauses_recording_vs_not() {
    println!("| RAM | method | first pause: stop / capture / memory / total (ms) | later pause: stop / capture / memory / total (ms) |");
    println!("|---|---|---|---|");
    for mb in sizes(&[256, 4096]) {
        let mut rows: [Vec<[f64; 8]>; 2] = Default::default();
        for k in 0..3 {
            for (i, full) in [false, true].into_iter().enumerate() {
                let vm = boot(&format!("brec{mb}-{k}-{full}"), mb * MB);
                vm.set_full_layers(full);
                populate(&vm, fill());
                vm.prepare_freeze().unwrap();
                let a = vm.clone_children(1, &CloneOptions::default()).unwrap();
                assert!(ask(&vm, "alloc 180").starts_with("ok"));
                let b = vm.clone_children(1, &CloneOptions::default()).unwrap();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let (f, l) = (&a.freeze, &b.freeze);
                rows[i].push([
                    ms(f.stop_vcpus),
                    ms(f.capture),
                    ms(f.memory),
                    ms(f.pause),
                    ms(l.stop_vcpus),
                    ms(l.capture),
                    ms(l.memory),
                    ms(l.pause),
                ]);
                drop((a, b));
                vm.stop().unwrap();
            }
        }
        for (i, name) in ["recording", "not recording"].into_iter().enumerate() {
            let med = |k: usize| {
                let mut v: Vec<f64> = rows[i].iter().map(|r| r[k]).collect();
                v.sort_by(f64::total_cmp);
                v[1]
            };
            println!(
                "| {mb} MiB | {name} | {:.2} / {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} / {:.2} |",
                med(0), med(1), med(2), med(3), med(4), med(5), med(6), med(7)
            );
        }
    }
}
