//! Boot setup per the boot contract in `kscope_guest::abi::{layout, boot}`: GDT, TSS, IDTR,
//! boot page tables, BootInfo, GenPage and the entry register state.

pub mod gdt;
pub mod info;
pub mod paging;

use crate::error::VmError;
use crate::hypervisor::{BootCpuState, DescTable, Regs, SpecialRegs};
use crate::memory::GuestRam;
use crate::mode::CpuMode;
use kscope_guest::abi::as_bytes;
use kscope_guest::abi::boot::{DeviceDesc, Identity};
use kscope_guest::abi::layout::{
    phys_to_virt, BOOT_INFO_GPA, BOOT_STACK_TOP_GPA, GDT_GPA, GENPAGE_GPA, IDT_GPA, PVM_PAGE_GPA,
    TSS_GPA,
};

/// CR0: PE | MP | ET | NE | WP | AM | PG.
pub const CR0: u64 = 0x8005_0033;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// Inputs of the boot setup.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Virtual entry point of the kernel.
    pub entry: u64,
    /// First page after the kernel image.
    pub kernel_phys_end: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Devices in the MMIO window.
    pub devices: &'a [DeviceDesc],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The CPU mode the kernel is asked to run in.
    pub mode: CpuMode,
}

/// Write every boot structure into `ram` and return the boot vCPU's entry state.
pub fn setup(ram: &GuestRam, p: &BootParams<'_>) -> Result<BootCpuState, VmError> {
    let info = info::boot_info(
        p.vcpus,
        ram.size(),
        p.kernel_phys_end,
        p.tsc_khz,
        p.devices,
        p.cmdline,
        p.mode,
    )?;
    ram.write(BOOT_INFO_GPA, as_bytes(&info))?;
    let gen = info::gen_page(0, 0, Identity::default())?;
    ram.write(GENPAGE_GPA, as_bytes(&gen))?;
    ram.write(GDT_GPA, &gdt::gdt_bytes())?;
    ram.write(TSS_GPA, &gdt::tss_bytes())?;
    ram.write(IDT_GPA, &[0u8; 4096])?;
    ram.write(PVM_PAGE_GPA, &[0u8; 4096])?;
    for (gpa, page) in paging::build(ram.size(), p.mode == CpuMode::Native) {
        ram.write(gpa, &page)?;
    }
    Ok(entry_state(p.entry))
}

/// The register state at the kernel's first instruction.
pub fn entry_state(entry: u64) -> BootCpuState {
    let data = gdt::kernel_data_segment();
    BootCpuState {
        sregs: SpecialRegs {
            cs: gdt::kernel_code_segment(),
            data,
            tr: gdt::tss_segment(),
            gdt: DescTable {
                base: phys_to_virt(GDT_GPA),
                limit: (gdt::GDT_ENTRIES * 8 - 1) as u16,
            },
            idt: DescTable {
                base: phys_to_virt(IDT_GPA),
                limit: 4095,
            },
            cr0: CR0,
            cr3: paging::PML4_GPA,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            efer: EFER_LME | EFER_LMA | EFER_NXE,
        },
        regs: Regs {
            rip: entry,
            rsp: phys_to_virt(BOOT_STACK_TOP_GPA),
            rdi: phys_to_virt(BOOT_INFO_GPA),
            rflags: 0x2,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kscope_guest::abi::layout::{selectors, DIRECT_MAP_BASE};

    #[test]
    fn entry_state_follows_the_contract() {
        let s = entry_state(0xffff_ffff_8010_0000);
        assert_eq!(s.regs.rip, 0xffff_ffff_8010_0000);
        assert_eq!(s.regs.rsp, DIRECT_MAP_BASE + 0x3_0000);
        assert_eq!(s.regs.rdi, DIRECT_MAP_BASE + 0x1000);
        assert_eq!(s.regs.rflags, 2);
        assert_eq!(s.sregs.cs.selector, selectors::KERNEL_CS);
        assert_eq!(s.sregs.data.selector, selectors::KERNEL_DS);
        assert_eq!(s.sregs.tr.selector, selectors::TSS);
        assert_eq!(s.sregs.tr.type_, 0xb);
        assert_eq!(s.sregs.cr0, 0x8005_0033);
        assert_eq!(s.sregs.cr4, 0x620);
        assert_eq!(s.sregs.efer, 0xd00);
        assert_eq!(s.sregs.idt.limit, 4095);
        assert_eq!(s.sregs.gdt.base, DIRECT_MAP_BASE + 0x2000);
    }

    #[test]
    fn setup_writes_the_structures() {
        let ram = GuestRam::new("boot", 8 << 20).unwrap();
        let p = BootParams {
            vcpus: 1,
            entry: 0xffff_ffff_8010_0000,
            kernel_phys_end: 0x10_2000,
            tsc_khz: 1000,
            devices: &[],
            cmdline: "x=1",
            mode: CpuMode::Native,
        };
        setup(&ram, &p).unwrap();
        let mut b = [0u8; 8];
        ram.read(BOOT_INFO_GPA, &mut b).unwrap();
        assert_eq!(&b, b"KSBOOT\0\0");
        ram.read(GENPAGE_GPA, &mut b).unwrap();
        assert_eq!(&b, b"KSGENID\0");
        ram.read(GDT_GPA + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x00af_9b00_0000_ffff);
        let rd = |gpa: u64| {
            let mut e = [0u8; 8];
            ram.read(gpa, &mut e).ok().map(|_| u64::from_le_bytes(e))
        };
        assert_eq!(
            paging::translate(paging::PML4_GPA, phys_to_virt(0x7f_f000), rd),
            Some(0x7f_f000)
        );
    }
}
