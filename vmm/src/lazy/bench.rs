//! Microbenchmarks of lazy memory serving (`cargo test -p kscope-vmm bench -- --ignored
//! --nocapture --test-threads=1`). They print numbers and check only sanity.

use std::sync::Arc;
use std::time::Instant;

use super::tests::{fd_guard, scratch_dir};
use super::*;
use crate::memory::GuestRam;
use crate::prefetch::{Fault, FaultPlan, Gfn, Install, OnDemand, Prefetcher};

fn data_image(pages: u64) -> Arc<MemfdImage> {
    let bytes: Vec<u8> = (0..pages * PAGE_SIZE as u64)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    Arc::new(MemfdImage::from_bytes(&bytes).unwrap())
}

/// Touches one byte of every page from one thread; returns ns per page.
fn touch_all(r: &LazyRegion) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut b = [0u8; 1];
            for g in 0..r.pages() {
                r.read_at(g * PAGE_SIZE as u64, &mut b).unwrap();
                // Without this the optimizer drops the unused read, and no page faults.
                std::hint::black_box(&b);
            }
        });
    });
    t0.elapsed().as_nanos() as f64 / r.pages() as f64
}

#[test]
#[ignore = "benchmark"]
fn bench_fault_service_copy_vs_zeropage() {
    let _g = fd_guard();
    let pages = 8192;
    let data: Arc<dyn PageSource> = data_image(pages);
    let zero: Arc<dyn PageSource> =
        Arc::new(MemfdImage::from_bytes(&vec![0; pages as usize * PAGE_SIZE]).unwrap());
    for (kind, spin) in [
        (RegionKind::SharedMemfd, 0),
        (RegionKind::AnonPrivate, 0),
        (RegionKind::SharedMemfd, 20),
        (RegionKind::SharedMemfd, 100),
    ] {
        for (what, src) in [("COPY", &data), ("ZEROPAGE", &zero)] {
            let region = LazyRegion::new(pages, kind).unwrap();
            let opts = ServerOptions {
                spin: std::time::Duration::from_micros(spin),
                ..Default::default()
            };
            let srv = FaultServer::start(region, src.clone(), Box::new(OnDemand), opts).unwrap();
            let per = touch_all(srv.region());
            let st = srv.shutdown().unwrap();
            println!(
                "fault {kind:?} spin {spin:3} us {what:8}: end-to-end {:6.1} us/fault; handler p50 {:5.1} us p99 {:5.1} us; resident {} KiB",
                per / 1e3,
                st.fault_ns_p50 as f64 / 1e3,
                st.fault_ns_p99 as f64 / 1e3,
                st.resident_bytes / 1024
            );
            assert_eq!(st.faults, pages);
        }
    }
    // Floor: first touch of fresh memory without userfaultfd.
    let g = GuestRam::new(
        "bench-floor",
        (pages * PAGE_SIZE as u64).next_multiple_of(2 << 20),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    for p in 0..pages {
        g.read(p * PAGE_SIZE as u64, &mut b).unwrap();
        std::hint::black_box(&b);
    }
    println!(
        "first touch of a fresh shared memfd page (no uffd): {:.2} us/page",
        t0.elapsed().as_nanos() as f64 / pages as f64 / 1e3
    );
}

struct Background(Vec<Gfn>);
impl Prefetcher for Background {
    fn name(&self) -> &str {
        "bg"
    }
    fn on_fault(&mut self, _f: Fault, _plan: &mut FaultPlan) {}
    fn background(&mut self) -> Vec<Install> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(Install::data)
            .collect()
    }
}

#[test]
#[ignore = "benchmark"]
fn bench_background_fetcher() {
    let _g = fd_guard();
    let pages = 32768u64;
    let src: Arc<dyn PageSource> = data_image(pages);
    let mut warm = [0u8; PAGE_SIZE];
    (0..pages).for_each(|g| src.read_page(g, &mut warm).unwrap()); // map the source once
    for (order, list) in [
        ("sequential", (0..pages).collect::<Vec<_>>()),
        ("strided", (0..pages).map(|i| (i * 97) % pages).collect()),
    ] {
        for batch in [true, false, true, false] {
            let region = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
            let opts = ServerOptions {
                batch_runs: batch,
                ..Default::default()
            };
            let mut srv = FaultServer::start(
                region,
                src.clone(),
                Box::new(Background(list.clone())),
                opts,
            )
            .unwrap();
            let t0 = Instant::now();
            srv.start_background().unwrap();
            srv.join_background().unwrap();
            let el = t0.elapsed().as_secs_f64();
            let st = srv.shutdown().unwrap();
            assert_eq!(st.background, pages);
            println!(
                "background {order:10} batch={batch:5}: {:8.0} pages/s ({:.0} MiB/s)",
                pages as f64 / el,
                pages as f64 * 4096.0 / el / 1048576.0
            );
        }
    }
    let dst = GuestRam::new("bench-eager", pages * PAGE_SIZE as u64).unwrap();
    let rep = eager_fill(src.as_ref(), |gpa, page| dst.write(gpa, page)).unwrap();
    println!(
        "eager copy: {:.0} pages/s ({} pages in {:.1} ms)",
        rep.copied as f64 / (rep.elapsed_ns as f64 / 1e9),
        rep.copied,
        rep.elapsed_ns as f64 / 1e6
    );
    // A FileImage source (page cache warm).
    let dir = scratch_dir("bench");
    let path = dir.join("mem");
    std::fs::write(&path, vec![7u8; pages as usize * PAGE_SIZE]).unwrap();
    let fimg: Arc<dyn PageSource> = Arc::new(FileImage::open(&path, None).unwrap());
    let region = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
    let mut srv = FaultServer::start(
        region,
        fimg,
        Box::new(Background((0..pages).collect())),
        ServerOptions::default(),
    )
    .unwrap();
    let t0 = Instant::now();
    srv.start_background().unwrap();
    srv.join_background().unwrap();
    println!(
        "background from FileImage (pread, warm): {:.0} pages/s",
        pages as f64 / t0.elapsed().as_secs_f64()
    );
    drop(srv);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[ignore = "benchmark"]
fn bench_many_clones() {
    let _g = fd_guard();
    let pages = 2048;
    let src: Arc<dyn PageSource> = data_image(pages);
    for n in [1usize, 8, 32] {
        let servers: Vec<FaultServer> = (0..n)
            .map(|i| {
                let r = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
                FaultServer::start(
                    r,
                    src.clone(),
                    Box::new(OnDemand),
                    ServerOptions {
                        name: format!("b{i}"),
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .collect();
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for srv in &servers {
                s.spawn(move || {
                    let mut b = [0u8; 1];
                    for g in 0..pages {
                        srv.region().read_at(g * PAGE_SIZE as u64, &mut b).unwrap();
                        std::hint::black_box(&b);
                    }
                });
            }
        });
        let el = t0.elapsed().as_secs_f64();
        let total = (n as u64 * pages) as f64;
        let p99 = servers
            .iter()
            .map(|s| s.stats().fault_ns_p99)
            .max()
            .unwrap();
        println!(
            "{n:2} clones x {pages} faults: {:.0} faults/s aggregate, worst handler p99 {:.1} us",
            total / el,
            p99 as f64 / 1e3
        );
    }
}

/// Per-page CRC-32 verification of a snapshot memory file (issue 10): fault service and a full
/// eager read, each from the plain file and from the verified image, in the same run, 5 rounds;
/// prints the medians and the ratio verified / plain.
#[test]
#[ignore = "benchmark"]
fn bench_verified_snapshot_pages() {
    let _g = fd_guard();
    let pages = 8192u64;
    let dir = scratch_dir("bench-verify");
    let path = dir.join("memory.kmem");
    let bytes: Vec<u8> = (0..pages * PAGE_SIZE as u64)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let crcs: Arc<[u32]> = bytes.chunks(PAGE_SIZE).map(page_crc).collect();
    let plain: Arc<dyn PageSource> = Arc::new(FileImage::open(&path, None).unwrap());
    let verified: Arc<dyn PageSource> =
        Arc::new(VerifiedImage::new(plain.clone(), crcs, "bench".into()).unwrap());
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (mut fault, mut read) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut page = [0u8; PAGE_SIZE];
    for _round in 0..5 {
        for (i, src) in [&plain, &verified].into_iter().enumerate() {
            let region = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
            let srv = FaultServer::start(
                region,
                src.clone(),
                Box::new(OnDemand),
                ServerOptions::default(),
            )
            .unwrap();
            fault[i].push(touch_all(srv.region()) / 1e3);
            let st = srv.shutdown().unwrap();
            assert_eq!(st.source_errors, 0);
            assert_eq!(st.faults, pages, "every page faults once: {st:?}");
            let t0 = Instant::now();
            for g in 0..pages {
                src.read_page(g, &mut page).unwrap();
            }
            read[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (what, unit, v) in [
        ("fault round trip", "us/fault", &fault),
        ("eager read of 32 MiB", "ms", &read),
    ] {
        let (p, pmin, pmax) = median(v[0].clone());
        let (q, qmin, qmax) = median(v[1].clone());
        println!(
            "{what}: plain {p:.2} {unit} [{pmin:.2}-{pmax:.2}], verified {q:.2} {unit} [{qmin:.2}-{qmax:.2}], ratio {:.2}",
            q / p
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
