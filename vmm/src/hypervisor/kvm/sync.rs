//! Fewer vCPU ioctls when a vCPU's state moves (the pause of a freeze, a clone's start).
//!
//! Every vCPU ioctl costs a fixed ~11 us on this host (PVM: `vcpu_load`/`vcpu_put`; 10 to 18 us
//! measured with `examples/ioctl_cost`, a VM ioctl costs 0.2 us), so saving a vCPU took 10
//! ioctls and loading it 9: about a quarter of a millisecond, inside the parent's pause, and
//! again in each clone. Two ways around them:
//!
//! - **Sync registers** (`KVM_CAP_SYNC_REGS`): with `kvm_valid_regs` set, every `KVM_RUN`
//!   leaves the general registers, special registers and pending events in the `kvm_run`
//!   page on its way out (measured: no extra cost per exit), so a vCPU stopped by a kick is
//!   saved without `KVM_GET_REGS`/`SREGS`/`VCPU_EVENTS`; with `kvm_dirty_regs` set, the next
//!   `KVM_RUN` loads them on its way in, without `KVM_SET_REGS`/`SREGS`/`VCPU_EVENTS`.
//! - **FPU from the XSAVE area**: the legacy (FXSAVE) region of the XSAVE area holds exactly
//!   what `KVM_GET_FPU` returns, and `KVM_SET_XSAVE` sets all of it, so the FPU needs no ioctl
//!   of its own where the XSAVE area is saved.
//!
//! [`SyncArea`] tracks whether the `kvm_run` copy is the vCPU's current state: it is after
//! any `KVM_RUN` returned and after a deferred load, not after a state was set by ioctl.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::{Cap, SyncReg, VcpuFd};
use std::sync::OnceLock;

/// The three parts of the vCPU state that travel through the `kvm_run` page.
const PARTS: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// Whether KVM offers sync registers for all three parts.
pub(super) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        super::kvm().is_ok_and(|k| {
            let mask: i32 = PARTS.iter().map(|&r| r as i32).sum();
            k.check_extension_int(Cap::SyncRegs) & mask == mask
        })
    })
}

/// What the `kvm_run` page of one vCPU holds.
#[derive(Debug, Default)]
pub(super) struct SyncArea {
    /// KVM fills the page on every exit (set once, when the vCPU is made).
    enabled: bool,
    /// The page holds the vCPU's current registers, special registers and events.
    current: bool,
}

/// The parts of the state the `kvm_run` page carries.
pub(super) struct Synced {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub events: kvm_vcpu_events,
}

impl SyncArea {
    /// Asks KVM to fill `fd`'s `kvm_run` page on every exit, where KVM can.
    pub(super) fn enable(fd: &mut VcpuFd) -> SyncArea {
        let enabled = supported();
        if enabled {
            for r in PARTS {
                fd.set_sync_valid_reg(r);
            }
        }
        SyncArea {
            enabled,
            current: false,
        }
    }

    /// A `KVM_RUN` returned (`ok`: through KVM's exit path, which fills the page).
    pub(super) fn after_run(&mut self, ok: bool) {
        self.current = self.enabled && ok;
    }

    /// The state was set by ioctl: the page is stale, and nothing it holds may be loaded.
    pub(super) fn invalidate(&mut self, fd: &mut VcpuFd) {
        if self.enabled {
            for r in PARTS {
                fd.clear_sync_dirty_reg(r);
            }
        }
        self.current = false;
    }

    /// The current registers, special registers and events, if the page holds them.
    pub(super) fn read(&self, fd: &VcpuFd) -> Option<Synced> {
        if !self.current {
            return None;
        }
        let s = fd.sync_regs();
        Some(Synced {
            regs: s.regs,
            sregs: s.sregs,
            events: s.events,
        })
    }

    /// Stores `state` in the page for the next `KVM_RUN` to load; false (nothing stored) if
    /// KVM cannot.
    pub(super) fn defer(&mut self, fd: &mut VcpuFd, state: Synced) -> bool {
        if !self.enabled {
            return false;
        }
        let s = fd.sync_regs_mut();
        s.regs = state.regs;
        s.sregs = state.sregs;
        s.events = state.events;
        for r in PARTS {
            fd.set_sync_dirty_reg(r);
        }
        self.current = true;
        true
    }
}

/// The FPU state held in the legacy (FXSAVE) region of an XSAVE area, as `KVM_GET_FPU`
/// returns it; `None` if the area is shorter than that region.
pub(super) fn fpu_from_xsave(region: &[u32]) -> Option<kvm_fpu> {
    if region.len() < 128 {
        return None;
    }
    let mut b = [0u8; 512];
    for (chunk, w) in b.chunks_exact_mut(4).zip(region) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let mut f = kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: b[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
        ..Default::default()
    };
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
    }
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A legacy (FXSAVE) region: control 0x027f, status 0x3800, tag 0x81, opcode 0x07ff, the
    /// instruction and data pointers, MXCSR 0x1fa0, ST(i) filled with 0x11 * (i + 1), XMM(i)
    /// with 0x0f ^ i.
    pub(super) fn legacy_region() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
        b[2..4].copy_from_slice(&0x3800u16.to_le_bytes());
        b[4] = 0x81;
        b[6..8].copy_from_slice(&0x07ffu16.to_le_bytes());
        b[8..16].copy_from_slice(&0xffff_8000_0010_2030u64.to_le_bytes());
        b[16..24].copy_from_slice(&0x0000_7fff_1234_5678u64.to_le_bytes());
        b[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for i in 0..8 {
            b[32 + 16 * i..42 + 16 * i].fill(0x11 * (i as u8 + 1));
        }
        for i in 0..16 {
            b[160 + 16 * i..176 + 16 * i].fill(0x0f ^ i as u8);
        }
        b
    }

    /// The FXSAVE fields land where `KVM_GET_FPU` puts them.
    #[test]
    fn fpu_fields_come_from_the_legacy_region() {
        let words: Vec<u32> = legacy_region()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .chain(std::iter::repeat_n(0, 896))
            .collect();
        let f = fpu_from_xsave(&words).unwrap();
        assert_eq!(
            (f.fcw, f.fsw, f.ftwx, f.last_opcode),
            (0x027f, 0x3800, 0x81, 0x07ff)
        );
        assert_eq!(
            (f.last_ip, f.last_dp),
            (0xffff_8000_0010_2030, 0x0000_7fff_1234_5678)
        );
        assert_eq!(f.mxcsr, 0x1fa0);
        assert_eq!((f.fpr[3][0], f.fpr[3][10]), (0x44, 0));
        assert_eq!(f.xmm[15], [0x0f ^ 15; 16]);
        assert!(fpu_from_xsave(&words[..100]).is_none());
    }
}

#[cfg(test)]
mod live {
    use super::*;

    /// On a real vCPU whose x87/SSE state is set (through the XSAVE area, with the header
    /// saying so), the FPU derived from `KVM_GET_XSAVE` equals `KVM_GET_FPU`, except MXCSR,
    /// which `KVM_GET_FPU` leaves 0 (the derived one has it). (`KVM_SET_FPU` alone does not
    /// mark the components in the header, so KVM's XSAVE export then reports the init state,
    /// which is what the guest would see.)
    #[test]
    fn derived_fpu_equals_kvm_get_fpu() {
        let kvm = super::super::kvm().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let mut x = vcpu.get_xsave().unwrap();
        let b = super::tests::legacy_region();
        for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes(c.try_into().unwrap());
        }
        // XSTATE_BV (bytes 512..520): x87 and SSE hold the state above.
        x.region[128] |= 0b11;
        // SAFETY: the area comes from KVM_GET_XSAVE on this vCPU (4 KiB `kvm_xsave`), with
        // only the legacy region and two header bits changed.
        unsafe { vcpu.set_xsave(&x) }.unwrap();
        let got = vcpu.get_fpu().unwrap();
        let mut derived = fpu_from_xsave(&vcpu.get_xsave().unwrap().region).unwrap();
        assert_eq!(derived.mxcsr, 0x1fa0);
        derived.mxcsr = got.mxcsr;
        assert_eq!(
            kscope_guest::abi::as_bytes(&derived),
            kscope_guest::abi::as_bytes(&got)
        );
        assert_eq!(got.fcw, 0x027f);
    }
}
