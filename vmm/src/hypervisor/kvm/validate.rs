//! Checks of a saved vCPU state before KVM sees it (snapshots are read from disk: a state file
//! with a correct checksum can still hold values no running x86-64 guest can have).
//!
//! kscope VMs always run in 64-bit long mode, so a saved state must be a long-mode state:
//! paging and protection on, EFER.LME/LMA set, a 64-bit code segment, a GDT, an IDT and a TSS,
//! page tables inside guest RAM, architecturally valid RFLAGS and canonical RIP/RSP.

use super::KvmArchState;
use crate::hypervisor::{Msr, Regs};

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// EFER bits KVM may report: SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE, AUTOIBRS.
const EFER_KNOWN: u64 = 1 | 1 << 8 | 0x3f << 10 | 1 << 21;
/// RFLAGS bit 1 is always set; these are always clear.
const RFLAGS_RESERVED: u64 = !0x3f_7fd7 | 1 << 3 | 1 << 5 | 1 << 15;
/// XSAVE area length (u32 words) of `kvm_xsave`.
const XSAVE_WORDS: usize = 1024;
/// More MSRs than any KVM lists.
const MAX_MSRS: usize = 1024;
/// `KVM_MAX_XCRS`.
const MAX_XCRS: u32 = 16;
/// Highest x86 MP state KVM accepts from user space (`KVM_MP_STATE_SIPI_RECEIVED`).
const MAX_MP_STATE: u32 = 4;
/// Physical-address bits of CR3 (bits 12..52).
const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;

fn canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    ((addr << shift) as i64 >> shift) as u64 == addr
}

impl KvmArchState {
    /// Checks that this, with the neutral registers `r` and `msrs`, is a 64-bit long-mode
    /// state whose page tables lie inside `mem_bytes` of guest RAM. The error names the field
    /// and the value.
    pub(crate) fn validate(&self, r: &Regs, msrs: &[Msr], mem_bytes: u64) -> Result<(), String> {
        let s = &self.sregs;
        if r.rflags & RFLAGS_RESERVED != 0 || r.rflags & 2 == 0 {
            return Err(format!(
                "regs.rflags {:#x} has reserved bits wrong (bit 1 must be set, bits 3, 5, 15 and 22-63 clear)",
                r.rflags
            ));
        }
        let la57 = s.cr4 & CR4_LA57 != 0;
        for (name, v) in [("regs.rip", r.rip), ("regs.rsp", r.rsp)] {
            if !canonical(v, la57) {
                return Err(format!("{name} {v:#x} is not a canonical address"));
            }
        }
        if s.cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG || s.cr0 >> 32 != 0 {
            return Err(format!(
                "sregs.cr0 {:#x}: a long-mode state has PE and PG set and bits 32-63 clear",
                s.cr0
            ));
        }
        if s.cr4 & CR4_PAE == 0 || s.cr4 >> 32 != 0 {
            return Err(format!(
                "sregs.cr4 {:#x}: a long-mode state has PAE set and bits 32-63 clear",
                s.cr4
            ));
        }
        if s.efer & (EFER_LME | EFER_LMA) != EFER_LME | EFER_LMA || s.efer & !EFER_KNOWN != 0 {
            return Err(format!(
                "sregs.efer {:#x}: a long-mode state has LME and LMA set and no unknown bits",
                s.efer
            ));
        }
        let pml4 = s.cr3 & CR3_ADDR;
        if pml4.checked_add(4096).is_none_or(|end| end > mem_bytes)
            || s.cr3 & !CR3_ADDR & !0xfff != 0
        {
            return Err(format!(
                "sregs.cr3 {:#x}: the page-table root is outside the {mem_bytes:#x} bytes of guest RAM",
                s.cr3
            ));
        }
        let cs = &s.cs;
        if cs.present == 0 || cs.s == 0 || cs.type_ & 8 == 0 || cs.l == 0 {
            return Err(format!(
                "sregs.cs (selector {:#x}, type {}, present {}, l {}) is not a present 64-bit code segment",
                cs.selector, cs.type_, cs.present, cs.l
            ));
        }
        if s.tr.present == 0 || s.tr.s != 0 || s.tr.type_ & 0x9 != 0x9 {
            return Err(format!(
                "sregs.tr (selector {:#x}, type {}, present {}) is not a present 64-bit TSS",
                s.tr.selector, s.tr.type_, s.tr.present
            ));
        }
        for (name, t) in [("sregs.gdt", &s.gdt), ("sregs.idt", &s.idt)] {
            if t.limit == 0 || !canonical(t.base, la57) {
                return Err(format!(
                    "{name} (base {:#x}, limit {}) is empty or not canonical",
                    t.base, t.limit
                ));
            }
        }
        if self.fpu.mxcsr & 0xffff_0000 != 0 {
            return Err(format!(
                "fpu.mxcsr {:#x} has reserved bits set",
                self.fpu.mxcsr
            ));
        }
        if let Some(x) = &self.xsave {
            if x.len() != XSAVE_WORDS {
                return Err(format!(
                    "xsave has {} words, expected {XSAVE_WORDS}",
                    x.len()
                ));
            }
            if x[6] & 0xffff_0000 != 0 {
                return Err(format!("xsave MXCSR {:#x} has reserved bits set", x[6]));
            }
        }
        if let Some(x) = &self.xcrs {
            if x.nr_xcrs > MAX_XCRS {
                return Err(format!(
                    "xcrs lists {} registers, at most {MAX_XCRS}",
                    x.nr_xcrs
                ));
            }
            for c in x.xcrs.iter().take(x.nr_xcrs as usize) {
                if c.xcr == 0 && c.value & 1 == 0 {
                    return Err(format!("xcrs XCR0 {:#x} lacks the x87 bit", c.value));
                }
            }
        }
        if msrs.len() > MAX_MSRS {
            return Err(format!("{} MSRs, at most {MAX_MSRS}", msrs.len()));
        }
        let e = &self.events;
        if e.exception.nr >= 32 || e.exception.injected > 1 || e.exception.pending > 1 {
            return Err(format!(
                "events.exception (vector {}, injected {}, pending {}) is not a valid exception",
                e.exception.nr, e.exception.injected, e.exception.pending
            ));
        }
        if e.nmi.injected > 1 || e.nmi.pending > 1 || e.nmi.masked > 1 || e.interrupt.injected > 1 {
            return Err("events: NMI or interrupt flags other than 0 or 1".into());
        }
        let d = &self.debugregs;
        if d.dr6 >> 32 != 0 || d.dr7 >> 32 != 0 {
            return Err(format!(
                "debugregs dr6 {:#x} / dr7 {:#x} have bits 32-63 set",
                d.dr6, d.dr7
            ));
        }
        if self.mp_state.mp_state > MAX_MP_STATE {
            return Err(format!(
                "mp_state {} is not a state a vCPU can be restored in (0..={MAX_MP_STATE})",
                self.mp_state.mp_state
            ));
        }
        Ok(())
    }
}

/// Checks the lengths of the KVM structures in a serialized [`KvmArchState`] (the value of
/// `arch.Kvm` in a saved vCPU) before it is parsed: `kvm-bindings` stores its structures as
/// byte arrays and silently pads a short array with zeros or drops the excess of a long one,
/// so a wrong length must be caught here.
pub(crate) fn check_raw_lengths(arch: &serde_json::Value) -> Result<(), String> {
    use std::mem::size_of;
    let blocks: [(&str, usize); 6] = [
        ("sregs", size_of::<kvm_bindings::kvm_sregs>()),
        ("fpu", size_of::<kvm_bindings::kvm_fpu>()),
        ("xcrs", size_of::<kvm_bindings::kvm_xcrs>()),
        ("events", size_of::<kvm_bindings::kvm_vcpu_events>()),
        ("debugregs", size_of::<kvm_bindings::kvm_debugregs>()),
        ("mp_state", size_of::<kvm_bindings::kvm_mp_state>()),
    ];
    for (name, len) in blocks {
        match (name, &arch[name]) {
            ("xcrs", serde_json::Value::Null) => {}
            (_, a) => match a.as_array() {
                Some(b) if b.len() == len => {}
                Some(b) => return Err(format!("{name} is {} bytes long, expected {len}", b.len())),
                None => return Err(format!("{name} is not a byte array")),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_and_canonical_addresses() {
        assert_eq!(RFLAGS_RESERVED & 0x202, 0, "IF and bit 1 are not reserved");
        assert_ne!(
            RFLAGS_RESERVED & (1 << 3 | 1 << 5 | 1 << 15 | 1 << 22 | 1 << 63),
            0
        );
        assert_eq!(RFLAGS_RESERVED & (1 << 21 | 1 << 18 | 1 << 9), 0);
        assert_eq!(
            EFER_KNOWN & (EFER_LME | EFER_LMA | 1 | 1 << 11),
            EFER_LME | EFER_LMA | 1 | 1 << 11
        );
        assert_eq!(EFER_KNOWN & (1 << 9 | 1 << 20 | 1 << 63), 0);
        assert!(canonical(0xffff_ffff_8010_0000, false));
        assert!(canonical(0x7fff_ffff_f000, false));
        assert!(!canonical(1 << 60, false));
        assert!(!canonical(0x8000_0000_0000, false));
    }
}
