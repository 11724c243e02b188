//! Structures the VMM writes into guest memory before the first instruction.

/// Magic of [`BootInfo`].
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"KSBOOT\0\0");
/// Version of the [`BootInfo`] layout (2: `guest_mode` and `pvm_page` appended).
pub const BOOT_INFO_VERSION: u32 = 2;
/// Maximum number of devices described in [`BootInfo`].
pub const MAX_DEVICES: usize = 8;
/// Maximum command-line length, including the terminating NUL.
pub const CMDLINE_MAX: usize = 1024;

/// Kind of a device in the MMIO window.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Unused slot.
    None = 0,
    /// virtio-blk over virtio-mmio: the read-only root file system.
    Block = 1,
    /// kscope request device over virtio-mmio (see [`crate::abi::request`]).
    Request = 2,
    /// virtio-net over virtio-mmio (see [`crate::abi::net`]).
    Net = 3,
}

/// One device in the MMIO window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceDesc {
    /// A [`DeviceKind`] value.
    pub kind: u32,
    /// Reserved (interrupt line when interrupts are used); 0 today.
    pub irq: u32,
    /// Guest-physical base of the device's MMIO registers.
    pub gpa: u64,
    /// Size of the MMIO region.
    pub size: u64,
}

/// Boot information block at [`crate::abi::layout::BOOT_INFO_GPA`].
///
/// The kernel reads it once at boot; the VMM never changes it afterwards.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs (the kernel runs on the boot vCPU only today).
    pub vcpus: u32,
    /// Bytes of guest RAM, starting at GPA 0 (a multiple of 2 MiB).
    pub mem_bytes: u64,
    /// First guest-physical address after the loaded kernel image, page aligned.
    pub kernel_phys_end: u64,
    /// TSC frequency in kHz (for the guest's clock).
    pub tsc_khz: u64,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// Length of the command line in bytes (without NUL).
    pub cmdline_len: u32,
    /// Devices in the MMIO window.
    pub devices: [DeviceDesc; MAX_DEVICES],
    /// Kernel command line (UTF-8, NUL terminated), e.g. `init=/bin/web agent=/bin/agent`.
    pub cmdline: [u8; CMDLINE_MAX],
    /// How the kernel should run: a [`cpu_mode`] value chosen by the VMM.
    pub guest_mode: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Guest-physical address of the page to register with [`pvm::MSR_NATIVE`] in
    /// [`cpu_mode::NATIVE`] (0 otherwise): zeroed, page aligned, used for nothing else.
    pub pvm_page: u64,
}

/// How the guest kernel runs on the hypervisor. The VMM asks for one in
/// [`BootInfo::guest_mode`]; the kernel reports the mode it actually runs in on
/// [`crate::abi::layout::ports::CPU_MODE`] at boot and after every clone.
pub mod cpu_mode {
    /// Every kernel instruction is interpreted by KVM's instruction emulator (any KVM host;
    /// the only mode where PVM's native switch is absent).
    pub const EMULATED: u32 = 0;
    /// The kernel runs on the hardware through PVM's native-supervisor switch
    /// ([`super::pvm::MSR_NATIVE`]).
    pub const NATIVE: u32 = 1;
}

/// This host's PVM interface (measured, undocumented: `shared/PLATFORM.md`).
pub mod pvm {
    /// Written by the guest kernel with the guest-physical address of a spare page: from the
    /// next instruction on, CPL0 code runs natively. The VMM reads it back as the page
    /// address with bit 10 set and restores that value in clones.
    pub const MSR_NATIVE: u32 = 0x4b56_4d10;
    /// Reads [`SIGNATURE`] on a PVM host (from the VMM and from the guest).
    pub const MSR_SIGNATURE: u32 = 0x4b56_4d11;
    /// "PVM".
    pub const SIGNATURE: u64 = 0x4d_5650;
    /// Bit the host always shows in [`MSR_NATIVE`] (an unregistered vCPU reads just this).
    pub const REGISTERED: u64 = 1 << 10;

    /// True if a value read from [`MSR_NATIVE`] means "a page is registered: the kernel runs
    /// natively" (the page address with [`REGISTERED`] set; `REGISTERED` alone means none).
    pub const fn is_registered(v: u64) -> bool {
        v & REGISTERED != 0 && v & !0xfff != 0
    }
    /// Interrupts are delivered in native mode only while one of these bits of the first
    /// word of the registered page is set.
    pub const IRQ_GATE_BITS: u64 = 0xff;
}

impl BootInfo {
    /// The command line as bytes.
    pub fn cmdline(&self) -> &[u8] {
        let n = (self.cmdline_len as usize).min(CMDLINE_MAX);
        &self.cmdline[..n]
    }
}

/// Magic of [`GenPage`].
pub const GENPAGE_MAGIC: u64 = u64::from_le_bytes(*b"KSGENID\0");

/// Clone-generation page at [`crate::abi::layout::GENPAGE_GPA`] (in the spirit of VMGenID).
///
/// The VMM writes it: at boot with `generation = 0`, and in every clone before its first
/// instruction with a new `generation`, the clone's id, a fresh random seed and its identity.
/// The kernel compares `generation` with the last value it saw whenever it wakes from `hlt`
/// and before handing out a request; on a change it delivers SIGCLONE to the processes that
/// registered for it (the guest agent and workload hooks).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GenPage {
    /// [`GENPAGE_MAGIC`].
    pub magic: u64,
    /// Bumped by the VMM for every clone; 0 in a VM that was booted.
    pub generation: u64,
    /// Clone id assigned by the VMM (0 for a booted VM).
    pub clone_id: u64,
    /// Fresh randomness from the host, to reseed the guest RNG.
    pub seed: [u8; 32],
    /// The clone's identity.
    pub identity: Identity,
}

/// Network identity of a VM (applied by the guest agent on clone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// MAC address (6 bytes used).
    pub mac: [u8; 8],
    /// IPv4 address, network byte order.
    pub ipv4: [u8; 4],
    /// Prefix length of the address.
    pub prefix_len: u32,
    /// Host name (NUL padded).
    pub hostname: [u8; 32],
}
