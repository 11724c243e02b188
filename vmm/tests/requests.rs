//! The request path end to end: a hand-assembled guest drives the request device over
//! virtio-mmio, woken by the HLT doorbell.

mod common;

use std::time::{Duration, Instant};

use common::driver::{echo_guest, notify_loop_guest};
use common::*;
use kscope_vmm::{ExitReason, Vm, VmState};

const T: Duration = Duration::from_secs(10);

#[test]
fn requests_are_answered_by_the_guest() {
    let vm = boot("echo", &echo_guest());
    vm.wait_ready(T)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial_output()));
    let r = vm.request(2, b"ping", T).unwrap();
    assert_eq!(r.status, 2);
    assert!(r.payload.is_empty());
    assert!(r.latency < T);
    // The request landed in an RX buffer with its header and payload.
    let mut b = [0u8; 20];
    vm.read_phys(common::driver::RX_BUFS, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), r.id);
    assert_eq!(&b[16..], b"ping");
    for kind in 10..50u32 {
        assert_eq!(
            vm.request(kind, &kind.to_le_bytes(), T).unwrap().status,
            kind
        );
    }
    assert_eq!(vm.request_counts(), (41, 41));
    assert_eq!(vm.state(), VmState::Running);
}

#[test]
fn many_concurrent_requests_more_than_rx_buffers() {
    let vm = boot("burst", &echo_guest());
    vm.wait_ready(T).unwrap();
    // 100 requests queued at once; the guest has 8 RX buffers and reposts them.
    let pending: Vec<_> = (0..100u32)
        .map(|k| (k, vm.submit(k + 1000, b"x").unwrap()))
        .collect();
    for (k, p) in pending {
        let r = p.wait(T).unwrap();
        assert_eq!(r.status, k + 1000);
    }
    // Requests from several host threads at once.
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let vm = &vm;
            s.spawn(move || {
                for i in 0..50u32 {
                    let k = t * 1000 + i;
                    assert_eq!(vm.request(k, b"", T).unwrap().status, k);
                }
            });
        }
    });
    assert_eq!(vm.request_counts(), (300, 300));
}

#[test]
fn stopping_fails_pending_requests() {
    // A guest that reports READY and halts forever without a driver.
    let code = Asm::new()
        .outl(kscope_guest::abi::layout::ports::READY, 1)
        .label("l")
        .hlt()
        .jmp("l")
        .finish();
    let vm = boot("stopper", &code);
    vm.wait_ready(T).unwrap();
    let p = vm.submit(1, b"never").unwrap();
    vm.stop().unwrap();
    assert!(matches!(p.wait(T), Err(kscope_vmm::VmError::Stopped(_))));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Measurements; run with `--nocapture` to see them.
#[test]
fn measure_boot_exit_and_request_costs() {
    // Boot: VM creation + setup until the first guest instruction (which writes READY).
    let ready = Asm::new()
        .outl(kscope_guest::abi::layout::ports::READY, 1)
        .label("l")
        .hlt()
        .jmp("l")
        .finish();
    let mut setup = vec![];
    let mut first = vec![];
    for i in 0..10 {
        let vm = boot(&format!("bootbench{i}"), &ready);
        let r = vm.wait_ready(T).unwrap();
        setup.push(r.setup_time);
        first.push(r.boot_time);
    }
    let (setup, first) = (median(setup), median(first));
    println!("boot: Vm::boot (create VM, RAM, load, boot structures, vCPU thread) median {setup:?}; to first instruction (READY exit) median {first:?}");
    assert!(first < Duration::from_secs(1));

    // Port-IO exit round trip: 200k writes to the COM1 scratch register.
    let n = 200_000u64;
    let io = Asm::new()
        .outl(kscope_guest::abi::layout::ports::READY, 1)
        .mov_imm(R::Rcx, n)
        .mov_edx(0x3ff)
        .label("l")
        .out_al()
        .dec(R::Rcx)
        .jcc(Cc::Ne, "l")
        .outl(kscope_guest::abi::layout::ports::POWEROFF, 0)
        .hlt()
        .finish();
    let vm = boot("iobench", &io);
    let r = vm.wait_ready(T).unwrap();
    wait_end(&vm, Duration::from_secs(60));
    let rep = vm.stop().unwrap();
    assert!(matches!(rep.reason, ExitReason::PowerOff(0)));
    let per_io = (rep.uptime - r.boot_time) / n as u32;
    println!("port-IO exit round trip (out to COM1 scratch, through the IO bus): {per_io:?}");

    // Baseline: the same guest under a bare KVM_RUN loop (hypervisor layer only, no buses,
    // no state machine), to attribute the cost.
    {
        use kscope_vmm::hypervisor::Exit;
        let ram = kscope_vmm::memory::GuestRam::new("raw", 16 << 20).unwrap();
        let elf = kscope_vmm::loader::build_test_elf(&io, 0x10_0000);
        let k = kscope_vmm::loader::load_kernel(&ram, &elf).unwrap();
        let hv = kscope_vmm::hypervisor::host().create_vm().unwrap();
        // SAFETY: `ram` outlives `hv` (declared before it, dropped after it).
        unsafe {
            hv.set_memory_slot(0, 0, ram.size(), ram.host_addr())
                .unwrap()
        };
        let mut vcpu = hv.create_vcpu(0).unwrap();
        let params = kscope_vmm::boot::BootParams {
            vcpus: 1,
            entry: k.entry,
            kernel_phys_end: k.phys_end,
            tsc_khz: 0,
            devices: &[],
            cmdline: "",
            mode: kscope_vmm::CpuMode::Emulated,
        };
        let st = kscope_vmm::boot::setup(&ram, &params).unwrap();
        vcpu.configure(&st, 1).unwrap();
        let mut outs = 0u64;
        let mut t0 = Instant::now();
        loop {
            match vcpu.run().unwrap() {
                Exit::IoOut { port, .. } if port == kscope_guest::abi::layout::ports::READY => {
                    t0 = Instant::now()
                }
                Exit::IoOut { port, .. } if port == kscope_guest::abi::layout::ports::POWEROFF => {
                    break
                }
                Exit::IoOut { .. } => outs += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(outs, n);
        println!(
            "port-IO exit round trip, bare KVM_RUN loop (same guest): {:?}",
            t0.elapsed() / n as u32
        );
    }

    // MMIO notify round trip.
    let n = 100_000u64;
    let vm = boot("mmiobench", &notify_loop_guest(n));
    let r = vm.wait_ready(T).unwrap();
    wait_end(&vm, Duration::from_secs(60));
    let rep = vm.stop().unwrap();
    assert!(
        matches!(rep.reason, ExitReason::PowerOff(0)),
        "{:?}",
        rep.reason
    );
    assert!(rep.exits.mmio >= n);
    let per_mmio = (rep.uptime - r.boot_time) / n as u32;
    println!("MMIO QueueNotify round trip (virtio-mmio register write, MMIO bus): {per_mmio:?}");

    // Request round trip through the HLT doorbell: host submit -> guest wakes from hlt ->
    // guest answers on TX with a notify -> host waiter wakes.
    let vm = Vm::boot(config("reqbench", &echo_guest())).unwrap();
    vm.wait_ready(T).unwrap();
    for _ in 0..100 {
        vm.request(1, b"warm", T).unwrap();
    }
    let n = 2000;
    let t0 = Instant::now();
    let mut lat = vec![];
    for _ in 0..n {
        lat.push(vm.request(1, b"0123456789abcdef", T).unwrap().latency);
    }
    let wall = t0.elapsed() / n;
    lat.sort();
    println!(
        "request round trip (sequential, 16-byte payload): mean {wall:?}, p50 {:?}, p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    let exits = vm.exit_counts();
    println!("exits for {} requests: {exits:?}", n + 100);
    let t0 = Instant::now();
    let pending: Vec<_> = (0..n).map(|_| vm.submit(1, b"x").unwrap()).collect();
    for p in pending {
        p.wait(T).unwrap();
    }
    println!(
        "request throughput (pipelined, 8 guest RX buffers): {:.0} req/s",
        n as f64 / t0.elapsed().as_secs_f64()
    );
}

#[test]
fn requests_before_ready_and_while_paused_are_delivered_later() {
    let vm = boot("early", &echo_guest());
    // Submitted while the guest is still setting up its driver.
    let early = vm.submit(5, b"early").unwrap();
    vm.wait_ready(T).unwrap();
    assert_eq!(early.wait(T).unwrap().status, 5);
    // Let the guest go idle, then pause: a request submitted now waits for resume.
    assert_eq!(vm.request(6, b"", T).unwrap().status, 6);
    vm.pause().unwrap();
    let p = vm.submit(7, b"paused").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(p.try_wait().is_none(), "answered while paused");
    vm.resume().unwrap();
    assert_eq!(p.wait(T).unwrap().status, 7);
    assert_eq!(vm.state(), VmState::Running);
}
