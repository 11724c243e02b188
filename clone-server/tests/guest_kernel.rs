//! System tests of the kscope guest kernel under the real VMM (KVM): boot, requests through
//! `/bin/ktest`, process isolation, and the kernel's page tables, page cache and frame
//! allocator as seen from outside through `read_phys` (the way the colorer sees them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kscope_guest::abi::from_bytes;
use kscope_guest::abi::kinfo::{
    file_kind, frame_use, proc_state, FileAbi, KInfo, ProcAbi, RadixNode, KINFO_MAGIC,
};
use kscope_guest::abi::layout::{
    DIRECT_MAP_BASE, KERNEL_VIRT_BASE, KINFO_GPA, MMIO_BASE, MMIO_VIRT_BASE, USER_END,
};
use kscope_guest::abi::request::kind;
use kscope_vmm::{Vm, VmConfig, VmError};

const T: Duration = Duration::from_secs(30);
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PCD: u64 = 0x10;
const PS: u64 = 0x80;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

fn program(path: &str) -> &'static [u8] {
    kscope_guest::PROGRAMS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| *b)
        .unwrap_or_else(|| panic!("program {path} not embedded"))
}

/// A data file of 3 pages and a tail, with a position-dependent pattern.
fn data_file(len: u32, salt: u32) -> Vec<u8> {
    (0..len)
        .map(|i| ((i ^ salt).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn start(name: &str, mem_mib: u64, cmdline: &str, files: &[(&str, u32, Vec<u8>)]) -> Vm {
    start_in(name, mem_mib, cmdline, files, kscope_vmm::GuestMode::Auto).expect("boot")
}

fn start_in(
    name: &str,
    mem_mib: u64,
    cmdline: &str,
    files: &[(&str, u32, Vec<u8>)],
    guest_mode: kscope_vmm::GuestMode,
) -> Result<Vm, VmError> {
    let mut b = kscope_guest::mkfs::FsBuilder::new();
    b.add("/bin/ktest", file_kind::EXEC, program("/bin/ktest"))
        .unwrap();
    b.add("/bin/kcrash", file_kind::EXEC, program("/bin/kcrash"))
        .unwrap();
    for (p, k, d) in files {
        b.add(p, *k, d).unwrap();
    }
    Vm::boot(VmConfig {
        name: name.into(),
        mem_bytes: mem_mib << 20,
        vcpus: 1,
        kernel: Arc::from(kscope_guest::KERNEL_ELF),
        cmdline: cmdline.into(),
        disk: Arc::from(b.build()),
        net: None,
        guest_mode,
    })
}

fn boot_with(name: &str, mem_mib: u64, files: &[(&str, u32, Vec<u8>)]) -> Vm {
    let vm = start(name, mem_mib, "init=/bin/ktest", files);
    if let Err(e) = vm.wait_ready(T) {
        panic!("not ready: {e}\nserial:\n{}", vm.serial_output());
    }
    vm
}

fn boot(name: &str) -> Vm {
    boot_with(name, 64, &[])
}

fn ask(vm: &Vm, payload: &[u8]) -> Vec<u8> {
    match vm.request(kind::WORKLOAD, payload, T) {
        Ok(r) => {
            assert_eq!(
                r.status,
                0,
                "status of {:?}: {:?}",
                String::from_utf8_lossy(payload),
                String::from_utf8_lossy(&r.payload)
            );
            r.payload
        }
        Err(e) => panic!(
            "request {:?} failed: {e}\nserial:\n{}",
            String::from_utf8_lossy(payload),
            vm.serial_output()
        ),
    }
}

fn ask_str(vm: &Vm, payload: &str) -> String {
    String::from_utf8(ask(vm, payload.as_bytes())).unwrap()
}

fn read<T: Copy>(vm: &Vm, gpa: u64) -> T {
    let mut b = vec![0u8; std::mem::size_of::<T>()];
    vm.read_phys(gpa, &mut b).unwrap();
    from_bytes(&b).unwrap()
}

fn read_u64(vm: &Vm, gpa: u64) -> u64 {
    read::<u64>(vm, gpa)
}

fn kinfo(vm: &Vm) -> KInfo {
    let k: KInfo = read(vm, KINFO_GPA);
    assert_eq!(k.magic, KINFO_MAGIC);
    k
}

/// Walk `va` in the tables at `cr3`: (leaf entry, page size) or None.
fn walk(vm: &Vm, cr3: u64, va: u64) -> Option<(u64, u64)> {
    let mut table = cr3 & ADDR;
    for level in (1..=4).rev() {
        let idx = (va >> (12 + 9 * (level - 1))) & 511;
        let e = read_u64(vm, table + idx * 8);
        if e & P == 0 {
            return None;
        }
        if level == 1 || e & PS != 0 {
            return Some((e, 1u64 << (12 + 9 * (level - 1))));
        }
        table = e & ADDR;
    }
    None
}

/// Kernel virtual address to physical, through the kernel's own page tables.
fn kphys(vm: &Vm, k: &KInfo, va: u64) -> u64 {
    let (e, size) = walk(vm, k.kernel_pml4, va).unwrap_or_else(|| panic!("{va:#x} unmapped"));
    (e & ADDR & !(size - 1)) + (va & (size - 1))
}

fn procs(vm: &Vm, k: &KInfo) -> Vec<ProcAbi> {
    (0..k.proc_max as u64)
        .map(|i| read::<ProcAbi>(vm, kphys(vm, k, k.proc_table + i * k.proc_stride as u64)))
        .filter(|p| p.state != proc_state::FREE)
        .collect()
}

fn files(vm: &Vm, k: &KInfo) -> Vec<FileAbi> {
    (0..k.file_max as u64)
        .map(|i| read::<FileAbi>(vm, kphys(vm, k, k.file_table + i * k.file_stride as u64)))
        .filter(|f| f.kind != file_kind::NONE)
        .collect()
}

fn gt(vm: &Vm, k: &KInfo, frame: u64) -> (u8, u32) {
    let w: u32 = read(vm, kphys(vm, k, k.ground_truth + frame * 4));
    ((w & 0xff) as u8, w >> 8)
}

#[test]
fn boots_echoes_and_answers_ping() {
    let vm = boot("kt-echo");
    assert_eq!(ask(&vm, b"echo hello"), b"hello");
    assert_eq!(ask(&vm, b"plain payload"), b"plain payload");
    let big: Vec<u8> = (0..12_000u32).map(|i| i as u8).collect();
    assert_eq!(ask(&vm, &big), big, "a 12 KB request is echoed intact");
    let r = vm.request(kind::PING, b"", T).expect("ping");
    assert_eq!(r.status, 0);
    let serial = vm.serial_output();
    assert!(serial.contains("ktest: pid 1 serving"), "{serial}");
    vm.stop().unwrap();
}

#[test]
fn boots_with_small_and_large_memory() {
    for mib in [16, 1024, 4096] {
        let t = Instant::now();
        let vm = boot_with(&format!("kt-mem{mib}"), mib, &[]);
        let boot = t.elapsed();
        let k = kinfo(&vm);
        assert_eq!(k.mem_bytes, mib << 20);
        assert_eq!(k.frame_count, (mib << 20) / 4096);
        assert_eq!(ask(&vm, b"echo sized"), b"sized");
        assert_eq!(ask_str(&vm, "alloc 64"), format!("ok 64 {}", 64 * 65 / 2));
        // The last RAM page is reachable through the direct map.
        let (e, _) = walk(&vm, k.kernel_pml4, DIRECT_MAP_BASE + (mib << 20) - 4096).unwrap();
        assert_eq!(e & NX, NX);
        println!("{mib} MiB: boot {boot:?}, {} free frames", k.free_frames);
        vm.stop().unwrap();
    }
}

#[test]
fn files_read_by_pread_and_mmap_match_the_image() {
    let small = data_file(3 * 4096 + 1234, 1);
    let large = data_file(300_000, 2);
    let vm = boot_with(
        "kt-files",
        64,
        &[
            ("/data/small", file_kind::DATA, small.clone()),
            ("/data/large", file_kind::DATA, large.clone()),
        ],
    );
    assert_eq!(ask(&vm, b"cat /data/small"), small);
    assert_eq!(ask(&vm, b"mmap /data/small"), small);
    assert_eq!(ask(&vm, b"cat /data/large"), large, "a multi-page response");
    assert_eq!(ask(&vm, b"mmap /data/large"), large);
    assert_eq!(ask(&vm, b"cat /bin/ktest"), program("/bin/ktest"));
    let r = vm.request(kind::WORKLOAD, b"cat /no/such", T).unwrap();
    assert_eq!(r.status, 2, "ENOENT");
    let ls = ask_str(&vm, "ls");
    assert_eq!(ls, "/bin/ktest\0/bin/kcrash\0/data/small\0/data/large\0");
    vm.stop().unwrap();
}

#[test]
fn fragmented_large_responses_arrive_intact() {
    let vm = boot_with("kt-scatter", 64, &[]);
    // 2.4 MB from a buffer whose 8-page physical runs alternate with another area's: more
    // pieces than one descriptor chain holds, so the kernel bounces it.
    let n = 600;
    let r = ask(&vm, format!("scatter {n}").as_bytes());
    assert_eq!(r.len(), n * 4096);
    for i in 0..n {
        assert_eq!(r[i * 4096], i as u8, "page {i}");
        assert!(
            r[i * 4096 + 1..(i + 1) * 4096].iter().all(|&b| b == 0),
            "page {i}"
        );
    }
    // And the bounce buffer went back to the allocator.
    assert_eq!(ask(&vm, b"echo ok"), b"ok");
    vm.stop().unwrap();
}

#[test]
fn anonymous_memory_is_given_back() {
    let vm = boot("kt-alloc");
    let before = kinfo(&vm).free_frames;
    assert_eq!(
        ask_str(&vm, "alloc 300"),
        format!("ok 300 {}", 300 * 301 / 2)
    );
    let after = kinfo(&vm).free_frames;
    // Page tables created for the area stay; the 300 data pages come back.
    assert!(before - after < 20, "free frames {before} -> {after}");
    vm.stop().unwrap();
}

#[test]
fn a_crashing_process_is_killed_and_the_rest_goes_on() {
    let vm = boot("kt-crash");
    let pid = ask_str(&vm, "crash");
    assert_eq!(pid, "2");
    let deadline = Instant::now() + T;
    while !vm.serial_output().contains("killed pid 2") {
        assert!(
            Instant::now() < deadline,
            "no kill message:\n{}",
            vm.serial_output()
        );
        ask(&vm, b"echo wait");
    }
    assert_eq!(ask(&vm, b"echo still here"), b"still here");
    let k = kinfo(&vm);
    let live = procs(&vm, &k);
    assert_eq!(live.len(), 1, "only ktest is left");
    assert_eq!(live[0].pid, 1);
    let serial = vm.serial_output();
    assert!(serial.contains("page fault at 0x0"), "{serial}");
    vm.stop().unwrap();
}

#[test]
fn every_kind_of_user_fault_kills_only_the_offender() {
    let modes = [
        "null",
        "write-text",
        "exec-data",
        "bad-syscall",
        "ud",
        "gp",
        "div0",
        "read-kernel",
        "write-kernel",
        "use-after-munmap",
        "write-mapped-file",
    ];
    let list = modes.join("\n").into_bytes();
    let vm = boot_with("kt-faults", 64, &[("/etc/kcrash", file_kind::DATA, list)]);
    ask(&vm, b"alloc 1");
    let free_before = kinfo(&vm).free_frames;
    for (i, m) in modes.iter().enumerate() {
        let pid = i + 2;
        assert_eq!(ask_str(&vm, "crash"), pid.to_string());
        let deadline = Instant::now() + T;
        while !vm.serial_output().contains(&format!("killed pid {pid} ")) {
            assert!(
                Instant::now() < deadline,
                "{m}: no kill message:\n{}",
                vm.serial_output()
            );
            ask(&vm, b"echo wait");
        }
        assert!(vm.serial_output().contains(&format!("kcrash: mode {m}")));
    }
    let serial = vm.serial_output();
    println!("{serial}");
    assert!(!serial.contains("survived"), "{serial}");
    assert_eq!(ask(&vm, b"echo alive"), b"alive");
    let k = kinfo(&vm);
    assert_eq!(procs(&vm, &k).len(), 1);
    // The killed processes' memory came back (page cache pages of /bin/kcrash stay cached).
    assert!(
        free_before - k.free_frames < 40,
        "free frames {free_before} -> {}",
        k.free_frames
    );
    vm.stop().unwrap();
}

#[test]
fn user_sse_state_survives_process_switches() {
    let vm = boot_with(
        "kt-fpu",
        64,
        &[("/etc/kcrash", file_kind::DATA, b"fpu-clobber".to_vec())],
    );
    assert_eq!(ask_str(&vm, "fpu"), "ok");
    let deadline = Instant::now() + T;
    while procs(&vm, &kinfo(&vm)).len() > 1 {
        assert!(Instant::now() < deadline, "kcrash did not exit");
        ask(&vm, b"echo wait");
    }
    assert!(vm.serial_output().contains("kcrash: mode fpu-clobber"));
    assert!(!vm.serial_output().contains("killed"));
    vm.stop().unwrap();
}

#[test]
fn random_bytes_differ_between_calls() {
    let vm = boot("kt-random");
    let a = ask(&vm, b"random");
    let b = ask(&vm, b"random");
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert_ne!(a, vec![0u8; 32]);
    vm.stop().unwrap();
}

#[test]
fn a_runaway_guest_is_caught_by_the_watchdog() {
    let vm = boot("kt-spin");
    match vm.request(kind::WORKLOAD, b"spin", Duration::from_secs(2)) {
        Err(VmError::Unresponsive { .. }) => {}
        other => panic!("expected Unresponsive, got {other:?}"),
    }
    let _ = vm.stop();
}

#[test]
fn page_tables_have_the_documented_layout() {
    for mode in [kscope_vmm::GuestMode::Auto, kscope_vmm::GuestMode::Emulated] {
        page_table_layout(mode);
    }
}

fn page_table_layout(mode: kscope_vmm::GuestMode) {
    let vm = start_in("kt-pt", 64, "init=/bin/ktest", &[], mode).unwrap();
    vm.wait_ready(T).unwrap();
    ask(&vm, b"alloc 4");
    let native = vm.cpu_mode() == Some(kscope_vmm::CpuMode::Native);
    // Native mode: the kernel half is user-accessible in the kernel-mode tables (PVM runs
    // the kernel at hardware CPL3); processes run on user-mode twins without it.
    let us = if native { US } else { 0 };
    let k = kinfo(&vm);
    let pml4 = k.kernel_pml4;
    // Kernel text: 4 KiB, supervisor, read-only, executable.
    let (e, size) = walk(&vm, pml4, k.text_start).unwrap();
    assert_eq!((size, e & (RW | US | NX)), (4096, us), "text {e:#x}");
    let (e, size) = walk(&vm, pml4, k.rodata_start).unwrap();
    assert_eq!((size, e & (RW | US | NX)), (4096, NX | us), "rodata {e:#x}");
    let (e, size) = walk(&vm, pml4, k.data_start).unwrap();
    assert_eq!(
        (size, e & (RW | US | NX)),
        (4096, RW | NX | us),
        "data {e:#x}"
    );
    assert_eq!(k.text_start, KERNEL_VIRT_BASE + 0x10_0000);
    // Direct map: 2 MiB, supervisor, NX, all of RAM and nothing more.
    for gpa in [0, 0x20_0000, k.mem_bytes - 0x20_0000] {
        let (e, size) = walk(&vm, pml4, DIRECT_MAP_BASE + gpa).unwrap();
        assert_eq!(
            (size, e & (US | NX), e & ADDR & !(size - 1)),
            (2 << 20, NX | us, gpa)
        );
    }
    assert!(walk(&vm, pml4, DIRECT_MAP_BASE + k.mem_bytes).is_none());
    // MMIO: uncached, NX.
    let (e, _) = walk(&vm, pml4, MMIO_VIRT_BASE).unwrap();
    assert_eq!((e & ADDR, e & (PCD | NX | US)), (MMIO_BASE, PCD | NX | us));
    // No user half in the kernel's tables.
    for i in 0..256 {
        assert_eq!(read_u64(&vm, pml4 + i * 8) & P, 0, "kernel PML4 entry {i}");
    }
    let p = procs(&vm, &k);
    let ktest = p.iter().find(|p| p.pid == 1).unwrap();
    assert_eq!(&ktest.name[..10], b"/bin/ktest");
    // The process shares the kernel half.
    for i in 256..512 {
        assert_eq!(
            read_u64(&vm, ktest.cr3 + i * 8),
            read_u64(&vm, pml4 + i * 8),
            "entry {i}"
        );
    }
    if native {
        // Its user-mode twin (the next frame) has the same user half and, of the kernel,
        // only the trampoline: a few 4 KiB pages, none of the direct map's 2 MiB pages.
        let twin = ktest.cr3 + 4096;
        for i in 0..256 {
            // (The accessed bit may differ: each table is walked on its own.)
            assert_eq!(
                read_u64(&vm, twin + i * 8) & !0x20,
                read_u64(&vm, ktest.cr3 + i * 8) & !0x20
            );
        }
        assert!(walk(&vm, twin, k.rodata_start).is_none());
        assert!(walk(&vm, twin, DIRECT_MAP_BASE + 0x20_0000).is_none());
        assert!(walk(&vm, twin, DIRECT_MAP_BASE + k.mem_bytes - 0x1000).is_none());
        assert!(walk(&vm, twin, MMIO_VIRT_BASE).is_none());
        let mut kernel_pages = 0;
        let mut v = KERNEL_VIRT_BASE + 0x10_0000;
        while v < k.data_start + (4 << 20) {
            if walk(&vm, twin, v).is_some() {
                kernel_pages += 1;
            }
            v += 4096;
        }
        assert!(
            (1..=6).contains(&kernel_pages),
            "{kernel_pages} kernel pages"
        );
    }
    // User text: user, read-only, executable, mapped from the page cache (bytes of the ELF).
    let elf = program("/bin/ktest");
    let (e, size) = walk(&vm, ktest.cr3, 0x40_0000).unwrap();
    assert_eq!((size, e & (US | RW | NX)), (4096, US), "user text {e:#x}");
    let mut page = vec![0u8; 4096];
    vm.read_phys(e & ADDR, &mut page).unwrap();
    assert_eq!(&page[..], &elf[..4096]);
    assert_eq!(gt(&vm, &k, (e & ADDR) >> 12), (frame_use::USER_CODE, 1));
    // Every user mapping is user-accessible and W^X; private pages belong to pid 1.
    let mut leaves = 0;
    let mut table4 = |va: u64, e: u64| {
        leaves += 1;
        assert_ne!(e & US, 0, "{va:#x}");
        assert!(e & RW == 0 || e & NX != 0, "W^X at {va:#x}: {e:#x}");
        let (u, owner) = gt(&vm, &k, (e & ADDR) >> 12);
        match u {
            frame_use::USER_DATA | frame_use::USER_CODE => assert_eq!(owner, 1, "{va:#x}"),
            frame_use::PAGE_CACHE_EXEC | frame_use::PAGE_CACHE_DATA => assert_eq!(e & RW, 0),
            other => panic!("user page {va:#x} has use {other}"),
        }
    };
    for_each_user_leaf(&vm, ktest.cr3, &mut table4);
    assert!(leaves > 5, "{leaves} user pages");
    vm.stop().unwrap();
}

fn for_each_user_leaf(vm: &Vm, cr3: u64, f: &mut dyn FnMut(u64, u64)) {
    fn rec(vm: &Vm, table: u64, level: u32, base: u64, f: &mut dyn FnMut(u64, u64)) {
        let n = if level == 4 { 256 } else { 512 };
        for i in 0..n {
            let e = read_u64(vm, table + i * 8);
            if e & P == 0 {
                continue;
            }
            let va = base + (i << (12 + 9 * (level - 1)));
            if level == 1 {
                assert!(va < USER_END);
                f(va, e);
            } else {
                assert_eq!(e & PS, 0, "no large user pages");
                rec(vm, e & ADDR, level - 1, va, f);
            }
        }
    }
    rec(vm, cr3 & ADDR, 4, 0, f);
}

#[test]
fn page_cache_radix_trees_index_the_file_data() {
    // 70 pages: the tree needs two levels.
    let big = data_file(70 * 4096 + 100, 3);
    let vm = boot_with(
        "kt-radix",
        64,
        &[("/data/big", file_kind::DATA, big.clone())],
    );
    assert_eq!(ask(&vm, b"cat /data/big"), big);
    let k = kinfo(&vm);
    let image_files: Vec<(&str, Vec<u8>)> = vec![
        ("/bin/ktest", program("/bin/ktest").to_vec()),
        ("/bin/kcrash", program("/bin/kcrash").to_vec()),
        ("/data/big", big),
    ];
    let fs = files(&vm, &k);
    assert_eq!(fs.len(), 3);
    for f in &fs {
        let n = f.name.iter().position(|&b| b == 0).unwrap();
        let name = std::str::from_utf8(&f.name[..n]).unwrap();
        let data = &image_files.iter().find(|(p, _)| *p == name).unwrap().1;
        assert_eq!(f.size, data.len() as u64);
        let mut found = 0;
        if f.radix_root != 0 {
            let root: RadixNode = read(&vm, f.radix_root - DIRECT_MAP_BASE);
            assert_eq!(root.parent, 0);
            check_node(&vm, &k, f, &root, f.radix_root, 0, data, &mut found);
        }
        assert_eq!(found, f.nr_cached, "{name}: leaves vs nr_cached");
        if name == "/data/big" {
            assert_eq!(found, 71, "every page of /data/big is cached");
        }
        if name == "/bin/ktest" {
            assert!(found > 0);
        }
    }
    vm.stop().unwrap();
}

#[allow(clippy::too_many_arguments)]
fn check_node(
    vm: &Vm,
    k: &KInfo,
    f: &FileAbi,
    n: &RadixNode,
    va: u64,
    base: u64,
    data: &[u8],
    found: &mut u64,
) {
    let mut count = 0;
    for (i, &slot) in n.slots.iter().enumerate() {
        if slot == 0 {
            continue;
        }
        count += 1;
        let index = base + ((i as u64) << n.shift);
        if n.shift == 0 {
            *found += 1;
            let gpa = slot - DIRECT_MAP_BASE;
            let mut page = vec![0u8; 4096];
            vm.read_phys(gpa, &mut page).unwrap();
            let off = (index * 4096) as usize;
            let end = (off + 4096).min(data.len());
            assert_eq!(&page[..end - off], &data[off..end], "page {index}");
            assert!(
                page[end - off..].iter().all(|&b| b == 0),
                "tail of page {index} is zero"
            );
            let (u, owner) = gt(vm, k, gpa >> 12);
            match u {
                frame_use::PAGE_CACHE_DATA | frame_use::PAGE_CACHE_EXEC => assert_eq!(owner, f.ino),
                frame_use::USER_CODE => assert_eq!(f.kind, file_kind::EXEC),
                other => panic!("cached page with use {other}"),
            }
        } else {
            let child: RadixNode = read(vm, slot - DIRECT_MAP_BASE);
            assert_eq!(child.shift + 6, n.shift);
            assert_eq!(child.parent, va);
            check_node(vm, k, f, &child, slot, index, data, found);
        }
    }
    assert_eq!(count, n.count, "node count");
}

#[test]
fn frame_bitmap_and_ground_truth_agree() {
    let vm = boot("kt-frames");
    ask(&vm, b"alloc 10");
    ask(&vm, b"cat /bin/kcrash");
    let k = kinfo(&vm);
    assert_eq!(k.frame_count, k.mem_bytes / 4096);
    let mut bitmap = vec![0u8; (k.frame_count / 8) as usize];
    vm.read_phys(kphys(&vm, &k, k.frame_bitmap), &mut bitmap)
        .unwrap();
    let mut truth = vec![0u8; (k.frame_count * 4) as usize];
    vm.read_phys(kphys(&vm, &k, k.ground_truth), &mut truth)
        .unwrap();
    let mut free = 0;
    let mut counts = [0u64; frame_use::COUNT as usize];
    for f in 0..k.frame_count as usize {
        let used = bitmap[f / 8] >> (f % 8) & 1 == 1;
        let u = truth[f * 4];
        assert!(u < frame_use::COUNT);
        assert_eq!(
            used,
            u != frame_use::FREE,
            "frame {f}: bitmap {used}, use {u}"
        );
        counts[u as usize] += 1;
        if !used {
            free += 1;
        }
    }
    assert_eq!(free, k.free_frames);
    assert_eq!(
        counts[frame_use::BOOT as usize],
        255,
        "first MiB minus the KInfo page"
    );
    for u in [
        frame_use::KERNEL_TEXT,
        frame_use::KERNEL_DATA,
        frame_use::PAGE_TABLE,
        frame_use::USER_CODE,
        frame_use::USER_DATA,
        frame_use::PAGE_CACHE_EXEC,
    ] {
        assert!(counts[u as usize] > 0, "no frame of use {u}: {counts:?}");
    }
    // Kernel text frames are exactly the text section.
    let text_frames = (k.text_end - k.text_start) / 4096;
    assert_eq!(counts[frame_use::KERNEL_TEXT as usize], text_frames);
    vm.stop().unwrap();
}

#[test]
fn sigclone_is_delivered_when_the_generation_changes() {
    let vm = boot("kt-sigclone");
    assert_eq!(ask_str(&vm, "sigclone"), "0 0");
    let r1 = ask(&vm, b"random");
    bump_generation(&vm, 7);
    assert_eq!(ask_str(&vm, "sigclone"), "1 1");
    assert_ne!(ask(&vm, b"random"), r1);
    let k = kinfo(&vm);
    assert_eq!((k.sigclone_count, k.seen_generation), (1, 1));
    assert!(vm.serial_output().contains("clone generation 1"));
    vm.stop().unwrap();
}

fn bump_generation(vm: &Vm, clone_id: u64) {
    use kscope_guest::abi::boot::GenPage;
    use kscope_guest::abi::layout::GENPAGE_GPA;
    vm.pause().unwrap();
    let mut g: GenPage = read(vm, GENPAGE_GPA);
    g.generation += 1;
    g.clone_id = clone_id;
    g.seed = [0x5a; 32];
    vm.memory()
        .load()
        .write(GENPAGE_GPA, kscope_guest::abi::as_bytes(&g))
        .unwrap();
    vm.resume().unwrap();
}

#[test]
fn an_agent_runs_beside_init_and_both_get_sigclone() {
    let vm = start("kt-agent", 64, "init=/bin/ktest agent=/bin/ktest", &[]);
    let report = vm
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial_output()));
    assert_eq!(report.ready_value, 2, "two processes started");
    assert_eq!(
        ask_str(&vm, "pid"),
        "1",
        "workload requests go to init, never to the agent"
    );
    bump_generation(&vm, 3);
    assert_eq!(ask_str(&vm, "sigclone"), "1 1");
    assert_eq!(ask_str(&vm, "pid"), "1");
    let k = kinfo(&vm);
    assert_eq!(k.sigclone_count, 2, "init and agent both registered");
    let mut pids: Vec<u32> = procs(&vm, &k).iter().map(|p| p.pid).collect();
    pids.sort();
    assert_eq!(pids, [1, 2]);
    vm.stop().unwrap();
}

#[test]
fn a_missing_init_is_reported_as_a_guest_panic() {
    let vm = start("kt-noinit", 64, "init=/bin/none", &[]);
    match vm.wait_ready(T) {
        Err(VmError::GuestPanic { code, serial_tail }) => {
            assert_eq!(code, kscope_guest::abi::panic_code::NO_INIT);
            assert!(
                serial_tail.contains("cannot start the init program"),
                "{serial_tail}"
            );
        }
        other => panic!("expected a guest panic, got {other:?}"),
    }
    let _ = vm.stop();
}

#[test]
fn init_exit_powers_the_vm_off_with_its_code() {
    let vm = boot("kt-exit");
    let _pending = vm.submit(kind::WORKLOAD, b"exit 3").unwrap();
    let deadline = Instant::now() + T;
    while vm.state() != kscope_vmm::VmState::Stopped {
        assert!(Instant::now() < deadline, "still {:?}", vm.state());
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = vm.stop().unwrap();
    assert!(
        matches!(report.reason, kscope_vmm::ExitReason::PowerOff(3)),
        "{:?}",
        report.reason
    );
}

#[test]
fn clones_get_sigclone_fresh_randomness_and_a_warm_page_cache() {
    let data = data_file(20 * 4096, 9);
    let vm = boot_with(
        "kt-clone",
        64,
        &[("/data/warm", file_kind::DATA, data.clone())],
    );
    assert_eq!(ask(&vm, b"cat /data/warm"), data);
    let parent_random = ask(&vm, b"random");
    let batch = vm
        .clone_children(2, &kscope_vmm::CloneOptions::default())
        .unwrap_or_else(|e| panic!("clone: {e}"));
    let mut randoms = vec![parent_random];
    for child in &batch.children {
        let sig = ask_str(child, "sigclone");
        let (count, generation) = sig.split_once(' ').unwrap();
        assert_eq!(count, "1", "{}", child.serial_output());
        let generation: u64 = generation.parse().unwrap();
        assert!(generation > 0);
        let k = kinfo(child);
        assert_eq!((k.sigclone_count, k.seen_generation), (1, generation));
        // The page cache came along: the file is served without a disk read (its radix
        // tree already holds every page).
        let f = files(child, &k)
            .into_iter()
            .find(|f| f.name.starts_with(b"/data/warm"))
            .unwrap();
        assert_eq!(f.nr_cached, 20);
        assert_eq!(ask(child, b"cat /data/warm"), data);
        randoms.push(ask(child, b"random"));
        assert!(child.serial_output().contains("clone generation"));
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        3,
        "parent and both clones draw different random bytes"
    );
    assert_eq!(
        ask_str(&vm, "sigclone"),
        "0 0",
        "the parent saw no clone event"
    );
    assert_eq!(ask(&vm, b"echo parent"), b"parent");
    for child in batch.children {
        child.stop().unwrap();
    }
    vm.stop().unwrap();
}

#[test]
fn a_clone_drops_the_requests_in_flight_at_the_clone_point() {
    let vm = boot("kt-inflight");
    let pending = vm.submit(kind::WORKLOAD, b"sleep 400").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let batch = vm
        .clone_children(1, &kscope_vmm::CloneOptions::default())
        .unwrap();
    let child = &batch.children[0];
    // The parent answers its request; the child finishes the same work but drops the answer.
    let r = pending.wait(T).unwrap();
    assert_eq!((r.status, r.payload.as_slice()), (0, &b"slept"[..]));
    assert_eq!(ask(child, b"echo child"), b"child");
    let serial = child.serial_output();
    assert!(serial.contains("dropped 1 requests"), "{serial}");
    assert_eq!(ask_str(child, "sigclone").split(' ').next(), Some("1"));
    for c in batch.children {
        c.stop().unwrap();
    }
    vm.stop().unwrap();
}

#[test]
fn measure_kernel_costs() {
    let t = Instant::now();
    let vm = boot("kt-bench");
    let boot_time = t.elapsed();
    let t = Instant::now();
    for _ in 0..20 {
        vm.request(kind::PING, b"", T).unwrap();
    }
    let ping = t.elapsed() / 20;
    let t = Instant::now();
    for _ in 0..20 {
        ask(&vm, b"echo x");
    }
    let echo = t.elapsed() / 20;
    let sys = ask_str(&vm, "bench-syscall 200");
    let pf = ask_str(&vm, "bench-fault 100");
    for l in vm.serial_output().lines().filter(|l| l.starts_with("prof")) {
        println!("{l}");
    }
    println!(
        "boot {boot_time:?}, ping {ping:?}, echo {echo:?}, getpid {sys} ns, anon fault {pf} ns"
    );
    vm.stop().unwrap();
}

/// What the kernel of `vm` says about its CPU mode, asked live through a system call.
fn live_mode(vm: &Vm) -> kscope_vmm::CpuMode {
    let v: u32 = ask_str(vm, "cpumode").parse().unwrap();
    kscope_vmm::CpuMode::from_abi(v).unwrap()
}

#[test]
fn the_emulated_mode_still_boots_serves_faults_and_clones() {
    use kscope_vmm::CpuMode;
    let vm = start_in(
        "kt-emu",
        64,
        "init=/bin/ktest",
        &[],
        kscope_vmm::GuestMode::Emulated,
    )
    .unwrap();
    vm.wait_ready(T).unwrap();
    assert_eq!(vm.cpu_mode(), Some(CpuMode::Emulated));
    assert_eq!(live_mode(&vm), CpuMode::Emulated);
    assert_eq!(ask(&vm, b"echo emulated"), b"emulated");
    assert!(ask_str(&vm, "bench-syscall 20").parse::<u64>().unwrap() > 0);
    ask(&vm, b"alloc 64");
    let batch = vm
        .clone_children(1, &kscope_vmm::CloneOptions::default())
        .unwrap();
    let child = &batch.children[0];
    assert_eq!(ask(child, b"echo child"), b"child");
    assert_eq!(child.cpu_mode(), Some(CpuMode::Emulated));
    assert_eq!(live_mode(child), CpuMode::Emulated);
    assert_eq!(live_mode(&vm), CpuMode::Emulated);
    for c in batch.children {
        c.stop().unwrap();
    }
    vm.stop().unwrap();
}

#[test]
fn native_mode_holds_in_clones_restores_and_the_frozen_parent() {
    use kscope_vmm::{CloneOptions, CpuMode, GuestMode, MemoryMode};
    let vm = match start_in("kt-nat", 64, "init=/bin/ktest", &[], GuestMode::Native) {
        Ok(vm) => vm,
        Err(VmError::ModeUnavailable(m)) => {
            eprintln!("SKIPPED: this host has no PVM native switch: {m}");
            return;
        }
        Err(e) => panic!("boot: {e}"),
    };
    vm.wait_ready(T).unwrap();
    assert_eq!(vm.cpu_mode(), Some(CpuMode::Native));
    assert_eq!(live_mode(&vm), CpuMode::Native);
    ask(&vm, b"alloc 64");
    for memory in [MemoryMode::Lazy, MemoryMode::Eager] {
        let opts = CloneOptions {
            memory,
            ..CloneOptions::default()
        };
        let batch = vm.clone_children(2, &opts).unwrap();
        for (i, c) in batch.children.iter().enumerate() {
            let msg = format!("child {i}");
            assert_eq!(ask(c, msg.as_bytes()), msg.as_bytes());
            assert_eq!(c.cpu_mode(), Some(CpuMode::Native), "{memory:?} child {i}");
            assert_eq!(live_mode(c), CpuMode::Native);
        }
        // The parent goes on natively after every freeze.
        assert_eq!(live_mode(&vm), CpuMode::Native);
        for c in batch.children {
            c.stop().unwrap();
        }
    }
    let dir = std::env::temp_dir().join(format!("kscope-native-snap-{}", std::process::id()));
    vm.snapshot(&dir).unwrap();
    for memory in [MemoryMode::Lazy, MemoryMode::Eager] {
        let r = Vm::restore(&dir, memory, "kt-nat-restored").unwrap();
        assert_eq!(ask(&r, b"echo restored"), b"restored");
        assert_eq!(live_mode(&r), CpuMode::Native, "{memory:?} restore");
        r.stop().unwrap();
    }
    assert_eq!(live_mode(&vm), CpuMode::Native);
    let _ = std::fs::remove_dir_all(&dir);
    vm.stop().unwrap();
}
