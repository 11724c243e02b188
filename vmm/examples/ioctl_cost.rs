//! What one vCPU ioctl costs on this host, against a VM ioctl and a `KVM_RUN` that returns at
//! once (with and without the sync-register area filled): the figures behind
//! `vmm/src/hypervisor/kvm/sync.rs`. Run: `cargo run --release -p kscope-vmm --example
//! ioctl_cost`.

use std::time::Instant;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, SyncReg};

const ROUNDS: u32 = 300;

fn time<T>(name: &str, mut f: impl FnMut() -> T) {
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(f());
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / f64::from(ROUNDS);
    println!("{name:>28}: {us:6.1} us");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let entries: Vec<kvm_msr_entry> = kvm
        .get_msr_index_list()?
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)?;
    time("KVM_GET_CLOCK (VM ioctl)", || vm.get_clock());
    time("KVM_GET_REGS", || vcpu.get_regs());
    time("KVM_GET_SREGS", || vcpu.get_sregs());
    time("KVM_GET_FPU", || vcpu.get_fpu());
    time("KVM_GET_XSAVE", || vcpu.get_xsave());
    time("KVM_GET_VCPU_EVENTS", || vcpu.get_vcpu_events());
    time("KVM_GET_MSRS (all listed)", || vcpu.get_msrs(&mut msrs));
    let regs = vcpu.get_regs()?;
    let sregs = vcpu.get_sregs()?;
    time("KVM_SET_REGS", || vcpu.set_regs(&regs));
    time("KVM_SET_SREGS", || vcpu.set_sregs(&sregs));
    vcpu.set_kvm_immediate_exit(1);
    time("KVM_RUN (immediate exit)", || vcpu.run().is_err());
    for r in [
        SyncReg::Register,
        SyncReg::SystemRegister,
        SyncReg::VcpuEvents,
    ] {
        vcpu.set_sync_valid_reg(r);
    }
    time("KVM_RUN, sync area filled", || vcpu.run().is_err());
    time("KVM_RUN, sync area loaded", || {
        for r in [
            SyncReg::Register,
            SyncReg::SystemRegister,
            SyncReg::VcpuEvents,
        ] {
            vcpu.set_sync_dirty_reg(r);
        }
        vcpu.run().is_err()
    });
    Ok(())
}
