//! Tests of lazy memory on real userfaultfd and memfds (root needed, no KVM).

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use super::*;
use crate::prefetch::{Fault, FaultPlan, Fill, Install, OnDemand, Prefetcher};

/// Tests that open descriptors or threads hold this shared; the leak test holds it
/// exclusively so that its before/after counts are exact.
pub(crate) static FD_LOCK: RwLock<()> = RwLock::new(());

/// Shared guard for tests that open descriptors.
pub(crate) fn fd_guard() -> RwLockReadGuard<'static, ()> {
    FD_LOCK.read().unwrap_or_else(|p| p.into_inner())
}

/// Page `g` of the test pattern: pseudo-random bytes seeded by `g` and `salt`; every 7th page
/// is all zeros.
fn page_of(g: u64, salt: u64) -> Vec<u8> {
    if g % 7 == 3 {
        return vec![0; PAGE_SIZE];
    }
    let mut x = g.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ 0xD1B5_4A32_D192_ED03;
    let mut v = Vec::with_capacity(PAGE_SIZE);
    while v.len() < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn image_bytes(pages: u64, salt: u64) -> Vec<u8> {
    (0..pages).flat_map(|g| page_of(g, salt)).collect()
}

fn image(pages: u64, salt: u64) -> Arc<MemfdImage> {
    Arc::new(MemfdImage::from_bytes(&image_bytes(pages, salt)).expect("memfd image"))
}

fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

fn read_page(r: &LazyRegion, g: Gfn) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    r.read_at(g * PAGE_SIZE as u64, &mut v).expect("read");
    v
}

impl StatsSnapshot {
    /// Faults whose service has completed (latency recorded).
    fn fault_latency_count(&self) -> u64 {
        self.fault_latency_samples
    }
}

/// A scriptable policy that records the faults it sees.
#[derive(Default)]
struct Script {
    ahead: u64,
    zero_even: bool,
    before: Vec<Gfn>,
    background: Vec<Gfn>,
    seen: Arc<Mutex<Vec<Fault>>>,
}

impl Prefetcher for Script {
    fn name(&self) -> &str {
        "script"
    }
    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        self.seen.lock().unwrap().push(fault);
        plan.fault = self.fill(fault.gfn);
        plan.prefetch
            .extend((fault.gfn + 1..=fault.gfn + self.ahead).map(|gfn| Install {
                gfn,
                fill: self.fill(gfn),
            }));
    }
    fn before_resume(&mut self) -> Vec<Install> {
        std::mem::take(&mut self.before)
            .into_iter()
            .map(Install::data)
            .collect()
    }
    fn background(&mut self) -> Vec<Install> {
        std::mem::take(&mut self.background)
            .into_iter()
            .map(Install::data)
            .collect()
    }
}

impl Script {
    fn fill(&self, gfn: Gfn) -> Fill {
        match self.zero_even && gfn.is_multiple_of(2) {
            true => Fill::Zero,
            false => Fill::Data,
        }
    }
}

fn serve(
    src: Arc<dyn PageSource>,
    pages: u64,
    kind: RegionKind,
    p: Box<dyn Prefetcher>,
) -> FaultServer {
    let region = LazyRegion::new(pages, kind).expect("lazy region (run as root)");
    FaultServer::start(region, src, p, ServerOptions::default()).expect("fault server")
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn every_page_is_served_correctly(kind: RegionKind) {
    let pages = 256;
    let src = image(pages, 1);
    let server = serve(src.clone(), pages, kind, Box::new(OnDemand));
    let region = server.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            for g in 0..pages {
                assert_eq!(crc(&read_page(region, g)), crc(&page_of(g, 1)), "page {g}");
            }
        });
    });
    // Counters are bumped right after the ioctl that woke the reader: let them settle.
    assert!(wait_until(|| server.stats().fault_latency_count() == pages));
    let st = server.stats();
    let zeros = (0..pages).filter(|g| g % 7 == 3).count() as u64;
    assert_eq!(st.faults, pages);
    assert_eq!(st.fault_pages, pages - zeros);
    assert_eq!(st.zero_filled, zeros);
    assert_eq!(st.bytes_copied, (pages - zeros) * PAGE_SIZE as u64);
    assert_eq!(st.touched_pages, pages);
    assert_eq!(st.present_pages, pages);
    assert_eq!(server.touched(), (0..pages).collect::<Vec<_>>());
    assert!(st.fault_ns_p50 > 0 && st.fault_ns_p50 <= st.fault_ns_max);
    assert!(
        st.resident_bytes >= (pages - zeros) * PAGE_SIZE as u64,
        "{st:?}"
    );
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"faults\":256"));
    server.shutdown().unwrap();
}

#[test]
fn every_page_is_served_correctly_shared_memfd() {
    let _g = fd_guard();
    every_page_is_served_correctly(RegionKind::SharedMemfd);
}

#[test]
fn every_page_is_served_correctly_anon_private() {
    let _g = fd_guard();
    every_page_is_served_correctly(RegionKind::AnonPrivate);
}

#[test]
fn writes_are_reported_and_land_on_served_content() {
    let _g = fd_guard();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let p = Script {
        seen: seen.clone(),
        ..Default::default()
    };
    let server = serve(image(16, 2), 16, RegionKind::SharedMemfd, Box::new(p));
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| r.write_at(5 * PAGE_SIZE as u64 + 10, &[0xAB; 4]).unwrap());
    });
    let mut expect = page_of(5, 2);
    expect[10..14].fill(0xAB);
    assert_eq!(read_page(r, 5), expect);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        &[Fault {
            gfn: 5,
            write: true
        }]
    );
}

#[test]
fn prefetch_lists_are_honoured() {
    let _g = fd_guard();
    let p = Script {
        ahead: 8,
        ..Default::default()
    };
    let server = serve(image(64, 3), 64, RegionKind::SharedMemfd, Box::new(p));
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(read_page(r, 20), page_of(20, 3)));
    });
    // Page 24 (24 % 7 == 3) is zero in the source: installed as a zero page.
    assert!(
        wait_until(|| server.stats().present_pages == 9),
        "{:?}",
        server.stats()
    );
    let st = server.stats();
    assert_eq!(
        (st.faults, st.fault_pages, st.prefetched, st.zero_filled),
        (1, 1, 7, 1)
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            for g in 21..=28 {
                assert_eq!(read_page(r, g), page_of(g, 3), "page {g}");
            }
        });
    });
    assert_eq!(server.stats().faults, 1, "prefetched pages must not fault");
    assert_eq!(server.touched(), vec![20]);
    assert!(!server.present_bitmap().get(29));
}

#[test]
fn zero_fill_policy_serves_zeros_without_reading() {
    let _g = fd_guard();
    let p = Script {
        ahead: 3,
        zero_even: true,
        ..Default::default()
    };
    let server = serve(image(32, 4), 32, RegionKind::SharedMemfd, Box::new(p));
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(read_page(r, 10), vec![0; PAGE_SIZE]));
    });
    assert!(wait_until(|| server.stats().present_pages == 4));
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(read_page(r, 11), page_of(11, 4));
            assert_eq!(read_page(r, 12), vec![0; PAGE_SIZE]);
            assert_eq!(read_page(r, 13), page_of(13, 4));
        });
    });
    let st = server.stats();
    assert_eq!(st.faults, 1, "{st:?}");
    assert_eq!((st.zero_filled, st.prefetched), (2, 2));
}

#[test]
fn before_resume_and_background_race_safely_with_faults() {
    let _g = fd_guard();
    let pages = 2048u64;
    let mut order: Vec<Gfn> = (0..pages).rev().collect();
    order.extend(0..pages); // duplicates must be skipped
    let p = Script {
        before: (0..64).collect(),
        background: order,
        ..Default::default()
    };
    let mut server = serve(image(pages, 5), pages, RegionKind::SharedMemfd, Box::new(p));
    let rep = server.before_resume().unwrap();
    assert_eq!(rep.requested, 64);
    assert_eq!(rep.copied + rep.zeroed, 64);
    server.start_background().unwrap();
    let r = server.region();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                let mut x = 12345 + t;
                for _ in 0..500 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let g = (x >> 33) % pages;
                    assert_eq!(crc(&read_page(r, g)), crc(&page_of(g, 5)), "page {g}");
                }
            });
        }
    });
    server.join_background().unwrap();
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            for g in 0..pages {
                assert_eq!(crc(&read_page(r, g)), crc(&page_of(g, 5)), "page {g}");
            }
        });
    });
    let settled = |st: &StatsSnapshot| st.fault_latency_count() == st.faults;
    assert!(wait_until(|| settled(&server.stats())));
    let st = server.stats();
    assert_eq!(st.present_pages, pages);
    assert_eq!(
        st.before_resume + st.background + st.fault_pages + st.prefetched + st.zero_filled,
        pages,
        "{st:?}"
    );
    assert!(st.background > 0);
    server.shutdown().unwrap();
}

#[test]
fn layered_image_prefers_newer_layers() {
    let _g = fd_guard();
    let pages = 128;
    let base: Arc<dyn PageSource> = image(pages, 6);
    let delta_img = image(pages, 7);
    let mut odd = Bitmap::new(pages);
    (1..pages).step_by(2).for_each(|g| odd.set(g));
    let mut layered = LayeredImage::new(base);
    layered.push(delta_img, odd).unwrap();
    // A third layer from a sparse file holding only page 40 (newest).
    let dir = scratch_dir("layer");
    let path = dir.join("mem");
    let f = std::fs::File::create(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &page_of(40, 8), 40 * PAGE_SIZE as u64).unwrap();
    drop(f);
    let file_img = Arc::new(FileImage::open(&path, Some(pages)).unwrap());
    assert_eq!(
        file_img.data_pages().iter_set().collect::<Vec<_>>(),
        vec![40]
    );
    let mut only40 = Bitmap::new(pages);
    only40.set(40);
    layered.push(file_img, only40).unwrap();
    assert_eq!(layered.depth(), 3);
    assert!(layered.push(image(pages, 9), Bitmap::new(3)).is_err());
    let server = serve(
        Arc::new(layered),
        pages,
        RegionKind::SharedMemfd,
        Box::new(OnDemand),
    );
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            for g in 0..pages {
                let want = if g == 40 {
                    page_of(40, 8)
                } else {
                    page_of(g, if g % 2 == 1 { 7 } else { 6 })
                };
                assert_eq!(read_page(r, g), want, "page {g}");
            }
        });
    });
    std::fs::remove_dir_all(dir).unwrap();
}

pub(crate) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "kscope-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn file_image_holes_and_short_files_read_as_zero() {
    let _g = fd_guard();
    let dir = scratch_dir("fileimg");
    let path = dir.join("mem");
    let f = std::fs::File::create(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &page_of(2, 1), 2 * PAGE_SIZE as u64).unwrap();
    drop(f);
    let img = FileImage::open(&path, Some(10)).unwrap();
    assert_eq!(img.pages(), 10);
    let mut buf = [1u8; PAGE_SIZE];
    img.read_page(2, &mut buf).unwrap();
    assert_eq!(buf.to_vec(), page_of(2, 1));
    for g in [0, 1, 3, 9] {
        assert!(img.is_known_zero(g));
        img.read_page(g, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    assert!(img.read_page(10, &mut buf).is_err());
    assert!(
        FileImage::open(&path, Some(2)).is_err(),
        "file longer than expected"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pages_beyond_the_source_are_zero() {
    let _g = fd_guard();
    let server = serve(image(4, 1), 8, RegionKind::SharedMemfd, Box::new(OnDemand));
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(read_page(r, 1), page_of(1, 1));
            assert_eq!(read_page(r, 6), vec![0; PAGE_SIZE]);
        });
    });
    let region = LazyRegion::new(2, RegionKind::SharedMemfd).unwrap();
    assert!(FaultServer::start(
        region,
        image(4, 1),
        Box::new(OnDemand),
        ServerOptions::default()
    )
    .is_err());
}

#[test]
fn discarded_pages_come_back_as_zeros() {
    let _g = fd_guard();
    for kind in [RegionKind::SharedMemfd, RegionKind::AnonPrivate] {
        let server = serve(image(16, 2), 16, kind, Box::new(OnDemand));
        let r = server.region();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(read_page(r, 4), page_of(4, 2));
                r.discard(4, 2).unwrap();
                assert_eq!(read_page(r, 4), vec![0; PAGE_SIZE], "{kind:?}");
                assert_eq!(read_page(r, 5), vec![0; PAGE_SIZE], "{kind:?}");
                assert_eq!(read_page(r, 6), page_of(6, 2));
            });
        });
        let st = server.stats();
        assert_eq!(st.removed, 2);
        assert_eq!(st.faults, 4, "{kind:?} {st:?}");
    }
}

#[test]
fn thirty_two_clones_fault_concurrently() {
    let _g = fd_guard();
    let pages = 512;
    let src = image(pages, 11);
    let servers: Vec<FaultServer> = (0..32)
        .map(|i| {
            let p = Script {
                ahead: (i % 3) as u64,
                ..Default::default()
            };
            let region = LazyRegion::new(pages, RegionKind::SharedMemfd).unwrap();
            let opts = ServerOptions {
                name: format!("c{i}"),
                ..Default::default()
            };
            FaultServer::start(region, src.clone(), Box::new(p), opts).unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for (i, srv) in servers.iter().enumerate() {
            s.spawn(move || {
                let mut x = 99 + i as u64;
                for _ in 0..300 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let g = (x >> 33) % pages;
                    assert_eq!(
                        crc(&read_page(srv.region(), g)),
                        crc(&page_of(g, 11)),
                        "clone {i} page {g}"
                    );
                }
            });
        }
    });
    for s in servers {
        let st = s.shutdown().unwrap();
        assert!(
            st.faults > 0 && st.install_errors == 0 && st.source_errors == 0,
            "{st:?}"
        );
    }
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).unwrap().count()
}

#[test]
fn create_destroy_cycles_leak_no_fds_or_threads() {
    let _x = FD_LOCK.write().unwrap_or_else(|p| p.into_inner());
    let src = image(64, 12);
    // Warm up lazily-initialised process state before counting.
    drop(serve(
        src.clone(),
        64,
        RegionKind::SharedMemfd,
        Box::new(OnDemand),
    ));
    let fds0 = count_dir("/proc/self/fd");
    let tasks0 = count_dir("/proc/self/task");
    for i in 0..200u64 {
        let p = Script {
            background: (0..64).collect(),
            ahead: 2,
            ..Default::default()
        };
        let mut server = serve(src.clone(), 64, RegionKind::SharedMemfd, Box::new(p));
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(read_page(server.region(), i % 64), page_of(i % 64, 12)));
        });
        server.start_background().unwrap();
        if i % 2 == 0 {
            server.shutdown().unwrap();
        } else {
            drop(server);
        }
    }
    assert!(
        wait_until(|| count_dir("/proc/self/fd") == fds0 && count_dir("/proc/self/task") == tasks0),
        "fds {fds0} -> {}, tasks {tasks0} -> {}",
        count_dir("/proc/self/fd"),
        count_dir("/proc/self/task")
    );
}

#[test]
fn eager_fill_skips_zero_pages() {
    let _g = fd_guard();
    let pages = 1024; // the smallest guest RAM (4 MiB)
    let src = image(pages, 13);
    let dst = crate::memory::GuestRam::new("eager-test", pages * PAGE_SIZE as u64).unwrap();
    let rep = eager_fill(src.as_ref(), |gpa, page| dst.write(gpa, page)).unwrap();
    let zeros = (0..pages).filter(|g| g % 7 == 3).count() as u64;
    assert_eq!((rep.copied, rep.zero), (pages - zeros, zeros));
    let file = dst.file().unwrap();
    assert_eq!(
        crate::hostmem::allocated_bytes(file.as_fd()).unwrap(),
        (pages - zeros) * PAGE_SIZE as u64
    );
    let mut v = vec![0; PAGE_SIZE];
    for g in 0..pages {
        dst.read(g * PAGE_SIZE as u64, &mut v).unwrap();
        assert_eq!(v, page_of(g, 13));
    }
}

#[test]
fn memfd_image_of_a_clone_memfd_sees_its_holes() {
    let _g = fd_guard();
    let fd = crate::hostmem::memfd_create(c"kscope-test", 8 * PAGE_SIZE as u64).unwrap();
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all_at(&page_of(3, 1), 3 * PAGE_SIZE as u64)
        .unwrap();
    let img = MemfdImage::new(fd, 8).unwrap();
    assert_eq!(img.data_pages().iter_set().collect::<Vec<_>>(), vec![3]);
    let mut buf = [0u8; PAGE_SIZE];
    img.read_page(3, &mut buf).unwrap();
    assert_eq!(buf.to_vec(), page_of(3, 1));
    assert!(img.is_known_zero(0) && !img.is_known_zero(3));
}

#[test]
fn a_frozen_clone_can_be_cloned() {
    let _g = fd_guard();
    let (src_pages, pages) = (32, 40);
    let a = serve(
        image(src_pages, 21),
        pages,
        RegionKind::SharedMemfd,
        Box::new(OnDemand),
    );
    let ra = a.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(read_page(ra, 1), page_of(1, 21));
            ra.write_at(2 * PAGE_SIZE as u64, &[9; 8]).unwrap();
            ra.write_at(35 * PAGE_SIZE as u64, &[7; 8]).unwrap(); // past the parent's image
            assert_eq!(read_page(ra, 6), page_of(6, 21));
            ra.discard(6, 1).unwrap();
        });
    });
    assert!(wait_until(|| a.stats().fault_latency_samples == 4));
    let frozen = a.freeze().unwrap();
    assert_eq!((frozen.pages(), frozen.depth()), (pages, 2));
    let b = serve(
        Arc::new(frozen),
        pages,
        RegionKind::SharedMemfd,
        Box::new(OnDemand),
    );
    let rb = b.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut p2 = page_of(2, 21);
            p2[..8].fill(9);
            let mut p35 = vec![0; PAGE_SIZE];
            p35[..8].fill(7);
            assert_eq!(read_page(rb, 1), page_of(1, 21));
            assert_eq!(read_page(rb, 2), p2);
            assert_eq!(read_page(rb, 35), p35);
            assert_eq!(
                read_page(rb, 6),
                vec![0; PAGE_SIZE],
                "discarded in the parent clone"
            );
            assert_eq!(
                read_page(rb, 9),
                page_of(9, 21),
                "never touched: from the original image"
            );
            assert_eq!(read_page(rb, 39), vec![0; PAGE_SIZE]);
        });
    });
    let anon = serve(image(4, 1), 4, RegionKind::AnonPrivate, Box::new(OnDemand));
    assert!(anon.freeze().is_err());
}

struct Panicky;
impl Prefetcher for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }
    fn on_fault(&mut self, fault: Fault, plan: &mut FaultPlan) {
        plan.prefetch.push(Install::data(u64::MAX)); // out of range: must be ignored
        plan.prefetch.push(Install::zero(fault.gfn + 1000));
        assert!(fault.gfn != 3, "policy bug");
    }
}

#[test]
fn a_misbehaving_policy_does_not_stall_the_clone() {
    let _g = fd_guard();
    let server = serve(image(8, 3), 8, RegionKind::SharedMemfd, Box::new(Panicky));
    let r = server.region();
    std::thread::scope(|s| {
        s.spawn(|| {
            for g in 0..8 {
                assert_eq!(read_page(r, g), page_of(g, 3));
            }
        });
    });
    assert!(wait_until(|| server.stats().fault_latency_samples == 8));
    assert_eq!(server.stats().install_errors, 0);
    server.shutdown().unwrap();
}
