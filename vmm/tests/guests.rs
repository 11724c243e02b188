//! Integration tests: boot hand-assembled guests under KVM and check every VM outcome.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kscope_guest::abi::boot::{BOOT_INFO_MAGIC, GENPAGE_MAGIC};
use kscope_guest::abi::layout::{ports, GENPAGE_GPA};
use kscope_vmm::{ExitReason, Vm, VmError, VmState};

const T: Duration = Duration::from_secs(10);

#[test]
fn hello_then_poweroff() {
    let code = Asm::new()
        .print("hi\n")
        .outl(ports::POWEROFF, 42)
        .hlt()
        .finish();
    let vm = boot("hello", &code);
    wait_end(&vm, T);
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(vm.serial_output(), "hi\n");
    let r = vm.stop().unwrap();
    assert!(
        matches!(r.reason, ExitReason::PowerOff(42)),
        "{:?}",
        r.reason
    );
    assert!(r.exits.io >= 4);
}

#[test]
fn boot_contract_seen_from_the_guest() {
    // Each check sets one bit of ebx; the exit code is ebx.
    let mut a = Asm::new();
    a.zero(R::Rbx);
    // 1: BootInfo magic through RDI.
    a.load64(R::Rax, R::Rdi, 0)
        .mov_imm(R::Rcx, BOOT_INFO_MAGIC)
        .cmp(R::Rax, R::Rcx);
    a.jcc(Cc::Ne, "c2").or_imm(R::Rbx, 1).label("c2");
    // 2: CS is the kernel code selector.
    a.mov_eax_cs()
        .and_imm(R::Rax, 0xffff)
        .mov_imm(R::Rcx, 0x08)
        .cmp(R::Rax, R::Rcx);
    a.jcc(Cc::Ne, "c3").or_imm(R::Rbx, 2).label("c3");
    // 3: TR is the TSS selector.
    a.str_eax()
        .and_imm(R::Rax, 0xffff)
        .mov_imm(R::Rcx, 0x28)
        .cmp(R::Rax, R::Rcx);
    a.jcc(Cc::Ne, "c4").or_imm(R::Rbx, 4).label("c4");
    // 4: the stack works.
    a.push(R::Rdi).pop(R::Rax).cmp(R::Rax, R::Rdi);
    a.jcc(Cc::Ne, "c5").or_imm(R::Rbx, 8).label("c5");
    // 5: GenPage magic through the direct map.
    a.mov_imm(R::Rsi, dm(GENPAGE_GPA))
        .load64(R::Rax, R::Rsi, 0)
        .mov_imm(R::Rcx, GENPAGE_MAGIC);
    a.cmp(R::Rax, R::Rcx)
        .jcc(Cc::Ne, "c6")
        .or_imm(R::Rbx, 16)
        .label("c6");
    // 6: CR0 as specified.
    a.mov_from_cr(0)
        .mov_imm(R::Rcx, 0x8005_0033)
        .cmp(R::Rax, R::Rcx);
    a.jcc(Cc::Ne, "c7").or_imm(R::Rbx, 32).label("c7");
    // 7: the last byte of RAM is mapped in the direct map (16 MiB guest).
    a.mov_imm(R::Rsi, dm((16 << 20) - 8))
        .mov_imm(R::Rax, 0x1234_5678)
        .store64(R::Rsi, 0, R::Rax);
    a.load64(R::Rcx, R::Rsi, 0).cmp(R::Rax, R::Rcx);
    a.jcc(Cc::Ne, "end").or_imm(R::Rbx, 64).label("end");
    a.mov(R::Rax, R::Rbx).out_eax_to(ports::POWEROFF).hlt();
    let vm = boot("contract", &a.finish());
    wait_end(&vm, T);
    let r = vm.stop().unwrap();
    match r.reason {
        ExitReason::PowerOff(code) => assert_eq!(code, 0x7f, "failed checks: {:#x}", !code & 0x7f),
        other => panic!("{other:?}"),
    }
    let mut b = [0u8; 8];
    vm.read_phys((16 << 20) - 8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
}

#[test]
fn ready_is_reported_with_boot_time() {
    let code = Asm::new()
        .outl(ports::READY, 3)
        .label("l")
        .hlt()
        .jmp("l")
        .finish();
    let vm = boot("ready", &code);
    let r = vm.wait_ready(T).unwrap();
    assert_eq!(r.ready_value, 3);
    assert!(r.boot_time >= r.setup_time);
    assert_eq!(vm.state(), VmState::Running);
    let rep = vm.stop().unwrap();
    assert!(matches!(rep.reason, ExitReason::Stopped));
    assert_eq!(vm.state(), VmState::Stopped);
}

#[test]
fn unknown_port_stops_the_vm() {
    let mut a = Asm::new();
    a.print("x").mov_edx(0x80);
    let at = a.here();
    a.out_al().hlt();
    let vm = boot("port", &a.finish());
    let err = vm.wait_ready(T).unwrap_err();
    match err {
        VmError::UnknownPort { port, rip } => {
            assert_eq!(port, 0x80);
            // RIP is at the `out` or just after it.
            assert!(rip == code_va(at) || rip == code_va(at + 1), "rip {rip:#x}");
        }
        other => panic!("{other}"),
    }
    assert!(matches!(vm.state(), VmState::Failed(ref s) if s.contains("0x80")));
}

#[test]
fn panic_port_reports_console_tail() {
    let code = Asm::new()
        .print("oops: bad thing\n")
        .outl(ports::PANIC, 5)
        .hlt()
        .finish();
    let vm = boot("panic", &code);
    match vm.wait_ready(T).unwrap_err() {
        VmError::GuestPanic { code, serial_tail } => {
            assert_eq!(code, 5);
            assert!(serial_tail.contains("oops: bad thing"));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn triple_fault_is_reported() {
    // The IDT is empty: #UD -> #NP -> #DF -> triple fault.
    let code = Asm::new().print("about to fault\n").ud2().finish();
    let vm = boot("triple", &code);
    match vm.wait_ready(T).unwrap_err() {
        VmError::TripleFault { serial_tail, .. } => assert!(serial_tail.contains("about to fault")),
        other => panic!("{other}"),
    }
}

#[test]
fn spinning_guest_is_unresponsive() {
    let mut a = Asm::new();
    a.outl(ports::READY, 1);
    let at = a.here();
    a.spin();
    let vm = boot("spin", &a.finish());
    vm.wait_ready(T).unwrap();
    let t0 = Instant::now();
    let err = vm.request(2, b"", Duration::from_millis(300)).unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    match err {
        VmError::Unresponsive { rip, .. } => assert_eq!(rip, code_va(at)),
        other => panic!("{other}"),
    }
    assert!(matches!(vm.state(), VmState::Failed(_)));
    // Further requests fail at once.
    assert!(vm.submit(2, b"").is_err());
}

#[test]
fn halting_guest_that_never_answers_is_unresponsive() {
    let mut a = Asm::new();
    a.outl(ports::READY, 1).label("l");
    let at = a.here();
    a.hlt().jmp("l");
    let vm = boot("halter", &a.finish());
    vm.wait_ready(T).unwrap();
    let pending = vm.submit(2, b"ping").unwrap();
    assert!(pending.try_wait().is_none());
    match pending.wait(Duration::from_millis(200)).unwrap_err() {
        VmError::Unresponsive { rip, timeout, .. } => {
            assert_eq!(timeout, Duration::from_millis(200));
            // Halted: RIP is after the hlt.
            assert!(rip == code_va(at) || rip == code_va(at + 1), "rip {rip:#x}");
        }
        other => panic!("{other}"),
    }
    // The vCPU blocked while idle instead of spinning through HLT exits.
    assert!(vm.exit_counts().hlt < 100, "{:?}", vm.exit_counts());
}

#[test]
fn pause_freezes_the_guest_and_resume_continues() {
    // Loop forever writing the COM1 scratch register.
    let code = Asm::new()
        .outl(ports::READY, 1)
        .mov_edx(ports::SERIAL_COM1 as u32 + 7)
        .label("l")
        .out_al()
        .jmp("l")
        .finish();
    let mut cfg = config("pause", &code);
    cfg.vcpus = 2; // the AP stays parked and must pause/resume too
    let vm = Vm::boot(cfg).unwrap();
    vm.wait_ready(T).unwrap();
    vm.pause().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let a = vm.exit_counts().io;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.exit_counts().io, a, "guest ran while paused");
    let states = vm.save_vcpu_states().unwrap();
    assert_eq!(states.len(), 2);
    assert!(vm.pause().is_err());
    vm.resume().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    std::thread::sleep(Duration::from_millis(50));
    assert!(vm.exit_counts().io > a, "guest did not resume");
    assert!(vm.resume().is_err());
    vm.stop().unwrap();
}

#[test]
fn a_failing_vm_does_not_affect_another() {
    // A: counts 20000 scratch-register writes, then powers off with 7.
    let good = Asm::new()
        .mov_imm(R::Rcx, 20_000)
        .mov_edx(ports::SERIAL_COM1 as u32 + 7)
        .label("l")
        .out_al()
        .dec(R::Rcx)
        .jcc(Cc::Ne, "l")
        .outl(ports::POWEROFF, 7)
        .hlt()
        .finish();
    let bad = Asm::new().mov_edx(0x99).out_al().hlt().finish();
    let a = boot("good", &good);
    let b = boot("bad", &bad);
    wait_end(&b, T);
    assert!(matches!(
        b.stop().unwrap().reason,
        ExitReason::Failed(VmError::UnknownPort { port: 0x99, .. })
    ));
    wait_end(&a, T);
    let r = a.stop().unwrap();
    assert!(
        matches!(r.reason, ExitReason::PowerOff(7)),
        "{:?}",
        r.reason
    );
    assert!(r.exits.io >= 20_000);
}

#[test]
fn bad_configs_are_rejected() {
    let code = Asm::new().hlt().finish();
    let bad = |f: &dyn Fn(&mut kscope_vmm::VmConfig)| {
        let mut c = config("bad", &code);
        f(&mut c);
        Vm::boot(c).unwrap_err()
    };
    assert!(matches!(
        bad(&|c| c.mem_bytes = (16 << 20) + 4096),
        VmError::BadConfig(_)
    ));
    assert!(matches!(
        bad(&|c| c.mem_bytes = (8 << 30) + (2 << 20)),
        VmError::BadConfig(_)
    ));
    assert!(matches!(bad(&|c| c.vcpus = 0), VmError::BadConfig(_)));
    assert!(matches!(
        bad(&|c| c.disk = vec![0u8; 100].into()),
        VmError::BadConfig(_)
    ));
    assert!(matches!(
        bad(&|c| c.kernel = vec![1u8, 2, 3].into()),
        VmError::Loader(_)
    ));
    assert!(matches!(
        bad(&|c| c.cmdline = "x".repeat(5000)),
        VmError::BadConfig(_)
    ));
}

#[test]
fn dropping_a_running_vm_stops_it() {
    let code = Asm::new().outl(ports::READY, 1).spin().finish();
    let vm = boot("drop", &code);
    vm.wait_ready(T).unwrap();
    let t0 = Instant::now();
    drop(vm);
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn unknown_mmio_stops_the_vm() {
    use kscope_guest::abi::layout::MMIO_BASE;
    let mut a = Asm::new();
    common::driver::map_mmio(&mut a);
    // Reading the block device's magic works; 1 MiB further there is no device.
    a.mov_imm(R::Rsi, dm(MMIO_BASE)).load32(R::Rax, R::Rsi, 0);
    a.mov_imm(R::Rcx, 0x7472_6976)
        .cmp(R::Rax, R::Rcx)
        .jcc(Cc::Ne, "bad");
    a.mov_imm(R::Rsi, dm(MMIO_BASE + 0x10_0000))
        .load32(R::Rax, R::Rsi, 0);
    a.label("bad").outl(ports::POWEROFF, 1).hlt();
    let vm = boot("mmio", &a.finish());
    wait_end(&vm, T);
    match vm.stop().unwrap().reason {
        ExitReason::Failed(VmError::UnknownMmio { addr, .. }) => {
            assert_eq!(addr, MMIO_BASE + 0x10_0000)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn guest_memory_can_be_repointed_while_paused() {
    use kscope_vmm::memory::GuestRam;
    const CNT: u64 = 0x60_0000;
    // Count forever in guest memory, exiting now and then so that pause is quick.
    let code = Asm::new()
        .mov_imm(R::Rsi, dm(CNT))
        .outl(ports::READY, 1)
        .mov_edx(ports::SERIAL_COM1 as u32 + 7)
        .label("l")
        .inc_mem64(R::Rsi, 0)
        .out_al()
        .jmp("l")
        .finish();
    let vm = boot("swap", &code);
    vm.wait_ready(T).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    let read = |vm: &Vm| {
        let mut b = [0u8; 8];
        vm.read_phys(CNT, &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    let v1 = read(&vm);
    assert!(v1 > 0);
    // A copy-on-write view of the same memfd: the guest keeps running on it, the file (the
    // frozen "generation image") does not change.
    let old = vm.memory().load();
    let cow =
        GuestRam::from_file(old.file().unwrap().clone(), old.size(), libc::MAP_PRIVATE).unwrap();
    let prev = vm.swap_memory(cow).unwrap();
    assert!(std::sync::Arc::ptr_eq(&prev, &old));
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    let v2 = read(&vm);
    assert!(
        v2 > v1,
        "guest did not continue on the new mapping ({v1} -> {v2})"
    );
    let mut b = [0u8; 8];
    old.read(CNT, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), v1, "the frozen image changed");
    vm.resume().unwrap();
    assert!(matches!(vm.state(), VmState::Running));
    // Swapping requires a paused VM.
    let again =
        GuestRam::from_file(old.file().unwrap().clone(), old.size(), libc::MAP_PRIVATE).unwrap();
    assert!(vm.swap_memory(again).is_err());
}
