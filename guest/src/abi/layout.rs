//! Guest-physical and guest-virtual memory layout shared by the VMM and the kscope guest kernel.
//!
//! Everything below 1 MiB is set up by the VMM before the first instruction; everything the
//! kernel allocates later comes from its frame allocator (frames above the kernel image).
//!
//! ```text
//! GPA 0x0000_1000  BootInfo (VMM -> kernel), one page
//! GPA 0x0000_2000  GDT (VMM), TSS at 0x2800 (VMM)
//! GPA 0x0000_3000  IDT (256 x 16 bytes; the VMM points IDTR at it, the kernel fills it)
//! GPA 0x0000_9000  KInfo descriptor (kernel -> outside readers), one page
//! GPA 0x0000_a000  clone-generation page (VMM -> kernel, VMGenID-like), one page
//! GPA 0x0000_b000  PVM page: registered by the kernel to run natively (host-owned)
//! GPA 0x0001_0000  VMM boot page tables (PML4 + PDPTs + PDs), up to 0x2_0000
//! GPA 0x0002_0000  boot stack (grows down from 0x3_0000)
//! GPA 0x0003_0000  trap stack: TSS.RSP0 / IST1 (grows down from 0x4_0000)
//! GPA 0x0010_0000  kernel image (ELF p_paddr), linked at KERNEL_VIRT_BASE + paddr
//! ...              frames managed by the kernel's frame allocator
//! GPA 0x2_0000_0000  MMIO window at 8 GiB (devices, 4 KiB each); guest RAM must end below it
//! ```

/// Size of a small page / frame.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Guest-physical address of [`crate::abi::BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the GDT written by the VMM.
pub const GDT_GPA: u64 = 0x2000;
/// Guest-physical address of the 64-bit TSS written by the VMM.
pub const TSS_GPA: u64 = 0x2800;
/// Guest-physical address of the IDT (IDTR points here; the kernel fills the gates).
pub const IDT_GPA: u64 = 0x3000;
/// Guest-physical address of the [`crate::abi::KInfo`] descriptor (like Linux's vmcoreinfo).
pub const KINFO_GPA: u64 = 0x9000;
/// Guest-physical address of the clone-generation page ([`crate::abi::GenPage`]).
pub const GENPAGE_GPA: u64 = 0xa000;
/// Guest-physical address of the page the kernel registers with PVM's native switch
/// ([`crate::abi::boot::pvm::MSR_NATIVE`]); zeroed by the VMM, used for nothing else.
pub const PVM_PAGE_GPA: u64 = 0xb000;
/// First guest-physical address of the VMM's boot page tables.
pub const BOOT_PT_GPA: u64 = 0x1_0000;
/// End (exclusive) of the area reserved for boot page tables.
pub const BOOT_PT_END: u64 = 0x2_0000;
/// Top of the boot stack (RSP at entry, as a direct-map address).
pub const BOOT_STACK_TOP_GPA: u64 = 0x3_0000;
/// Top of the trap stack (TSS.RSP0 and IST1, as direct-map addresses). Its top page is the
/// trampoline stack (mapped in processes' user-mode tables in native mode); the kernel runs
/// below it, from [`KERNEL_STACK_TOP_GPA`] down.
pub const TRAP_STACK_TOP_GPA: u64 = 0x4_0000;
/// Top of the kernel's own stack after entry from user mode.
pub const KERNEL_STACK_TOP_GPA: u64 = 0x3_f000;
/// Physical load address of the kernel image.
pub const KERNEL_PHYS_BASE: u64 = 0x10_0000;
/// Everything below this GPA is reserved for boot structures (never handed to the allocator).
pub const LOW_RESERVED_END: u64 = KERNEL_PHYS_BASE;

/// Base of the MMIO window, at 8 GiB (above 4 GiB, so that 4 GiB guests fit below it). Guest
/// RAM must end at or below this address.
pub const MMIO_BASE: u64 = 0x2_0000_0000;
/// Size of one device's MMIO region.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Largest guest RAM size the layout supports.
pub const MAX_GUEST_RAM: u64 = MMIO_BASE;

/// Virtual base of the kernel image mapping (like Linux's `__START_KERNEL_map`).
/// Kernel virtual address = `KERNEL_VIRT_BASE + physical address`.
pub const KERNEL_VIRT_BASE: u64 = 0xffff_ffff_8000_0000;
/// Virtual base of the direct map of all guest RAM (like Linux's `PAGE_OFFSET`).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// Virtual base where the kernel maps the MMIO window (uncached).
pub const MMIO_VIRT_BASE: u64 = 0xffff_c900_0000_0000;

/// Lowest user virtual address the kernel hands out (user ELFs are linked at 4 MiB).
pub const USER_IMAGE_BASE: u64 = 0x40_0000;
/// Base of the user anonymous/file mmap area (grows up).
pub const USER_MMAP_BASE: u64 = 0x10_0000_0000;
/// Top (exclusive) of the user stack.
pub const USER_STACK_TOP: u64 = 0x7fff_ffff_0000;
/// Largest user stack, in bytes (demand-paged).
pub const USER_STACK_MAX: u64 = 8 << 20;
/// First non-canonical address: user addresses are below this.
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// GDT selectors installed by the VMM.
pub mod selectors {
    /// Kernel 64-bit code segment.
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data segment.
    pub const KERNEL_DS: u16 = 0x10;
    /// User data segment (RPL 3).
    pub const USER_DS: u16 = 0x18 | 3;
    /// User 64-bit code segment (RPL 3).
    pub const USER_CS: u16 = 0x20 | 3;
    /// 64-bit TSS (16-byte descriptor).
    pub const TSS: u16 = 0x28;
}

/// Direct-map virtual address of a guest-physical address.
pub const fn phys_to_virt(gpa: u64) -> u64 {
    DIRECT_MAP_BASE + gpa
}

/// Guest-physical address of a direct-map virtual address.
pub const fn virt_to_phys(va: u64) -> u64 {
    va - DIRECT_MAP_BASE
}

/// I/O ports used by the kscope guest.
pub mod ports {
    /// 16550 UART (COM1) base port.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// `outl` here powers the guest off with the written value as exit code.
    pub const POWEROFF: u16 = 0x501;
    /// `outl` here reports a kernel panic; the value is a [`crate::abi::panic_code`] value.
    /// The panic message was written to the serial console before.
    pub const PANIC: u16 = 0x502;
    /// `outl` here tells the VMM that the kernel finished booting and the workload is ready
    /// to take requests (value: number of processes started).
    pub const READY: u16 = 0x503;
    /// `outl` here reports the [`crate::abi::boot::cpu_mode`] the kernel actually runs in
    /// (at boot, and again in every clone when it sees the new generation).
    pub const CPU_MODE: u16 = 0x504;
}
