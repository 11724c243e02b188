//! The kernel's self-description for outside readers (the colorer), in the spirit of Linux's
//! `vmcoreinfo`: a descriptor at a fixed guest-physical address that says where the process
//! table, the file table (with each file's page-cache radix tree) and the frame allocator are,
//! and which layout version their structs follow.
//!
//! All pointers stored in guest memory are kernel *virtual* addresses (direct map or kernel
//! image), exactly as a real kernel stores them; readers translate them with the kernel page
//! tables (`kernel_pml4`) or with `direct_map_base`.

/// Magic of [`KInfo`].
pub const KINFO_MAGIC: u64 = u64::from_le_bytes(*b"KSINFO\0\0");
/// Version of the layouts in this module. Bump on any change.
pub const KINFO_VERSION: u32 = 1;

/// Descriptor at [`crate::abi::layout::KINFO_GPA`], written by the kernel during boot
/// (before it reports READY) and kept up to date.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KInfo {
    /// [`KINFO_MAGIC`].
    pub magic: u64,
    /// [`KINFO_VERSION`].
    pub version: u32,
    /// `size_of::<KInfo>()`.
    pub size: u32,
    /// Virtual base of the direct map.
    pub direct_map_base: u64,
    /// Virtual base of the kernel image mapping.
    pub kernel_virt_base: u64,
    /// Guest-physical address of the kernel's own PML4 (the reference kernel address space).
    pub kernel_pml4: u64,
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Kernel text [start, end) as kernel virtual addresses.
    pub text_start: u64,
    /// End of kernel text.
    pub text_end: u64,
    /// Kernel read-only data [start, end).
    pub rodata_start: u64,
    /// End of kernel read-only data.
    pub rodata_end: u64,
    /// Kernel data + bss [start, end).
    pub data_start: u64,
    /// End of kernel data + bss.
    pub data_end: u64,
    /// Frame allocator bitmap (virtual address): bit `f` set means frame `f` is in use.
    pub frame_bitmap: u64,
    /// Number of frames the bitmap covers (= mem_bytes / 4096).
    pub frame_count: u64,
    /// Number of free frames (kept up to date).
    pub free_frames: u64,
    /// Process table (virtual address): `proc_max` entries of `proc_stride` bytes, each
    /// starting with a [`ProcAbi`].
    pub proc_table: u64,
    /// Capacity of the process table.
    pub proc_max: u32,
    /// Stride of a process-table entry.
    pub proc_stride: u32,
    /// File table (virtual address): `file_max` entries of `file_stride` bytes, each starting
    /// with a [`FileAbi`].
    pub file_table: u64,
    /// Capacity of the file table.
    pub file_max: u32,
    /// Stride of a file-table entry.
    pub file_stride: u32,
    /// Ground-truth frame-use table (virtual address), `frame_count` [`GroundTruth`] words.
    /// **For measuring colorer accuracy only: the colorer must never read it.**
    pub ground_truth: u64,
    /// Number of SIGCLONE deliveries the kernel made (for tests).
    pub sigclone_count: u64,
    /// Last clone generation the kernel saw.
    pub seen_generation: u64,
    /// Page-table isolation (native mode): the PML4 whose kernel half every process's
    /// user-mode PML4 copies; each process's user-mode PML4 is the frame right after its
    /// `cr3`. 0 when processes run on one PML4.
    pub user_pml4_template: u64,
}

/// Process state values of [`ProcAbi::state`].
pub mod proc_state {
    /// Slot unused.
    pub const FREE: u32 = 0;
    /// Runnable.
    pub const RUNNABLE: u32 = 1;
    /// Blocked (waiting for a request or an event).
    pub const BLOCKED: u32 = 2;
    /// Exited, not yet reaped.
    pub const ZOMBIE: u32 = 3;
}

/// Stable prefix of a process-table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcAbi {
    /// A [`proc_state`] value.
    pub state: u32,
    /// Process id (> 0 for a used slot).
    pub pid: u32,
    /// Guest-physical address of the process's PML4 (its CR3).
    pub cr3: u64,
    /// Program path (NUL padded), e.g. `/bin/web`.
    pub name: [u8; 32],
}

/// Kinds of files ([`FileAbi::kind`]).
pub mod file_kind {
    /// Slot unused.
    pub const NONE: u32 = 0;
    /// An executable (ELF) file.
    pub const EXEC: u32 = 1;
    /// A data file.
    pub const DATA: u32 = 2;
}

/// Stable prefix of a file-table entry (an in-memory inode).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileAbi {
    /// A [`file_kind`] value (NONE for an unused slot).
    pub kind: u32,
    /// Index of the file in the file system image.
    pub ino: u32,
    /// File size in bytes.
    pub size: u64,
    /// Root of the page-cache radix tree: virtual address of a [`RadixNode`], or 0 if the
    /// file has no cached page.
    pub radix_root: u64,
    /// Number of pages of this file in the page cache.
    pub nr_cached: u64,
    /// Path (NUL padded), e.g. `/data/lineitem.tbl`.
    pub name: [u8; 64],
}

/// Fan-out of a radix-tree node (like Linux's xarray: 64 slots, 6 bits of index per level).
pub const RADIX_FANOUT: usize = 64;
/// Bits of page index consumed per level.
pub const RADIX_SHIFT: u32 = 6;

/// A page-cache radix-tree node.
///
/// A node with `shift == 0` is a leaf: `slots[i]` is the direct-map virtual address of the
/// cached page for index `base + i`, or 0. A node with `shift = s > 0` is interior: `slots[i]`
/// is the virtual address of the child node covering indices whose bits `[s, s+6)` equal `i`,
/// or 0. A tree's height is given by the root's shift; index `i` is found by descending with
/// `(i >> node.shift) & 63`. Indices larger than the root covers are not cached.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RadixNode {
    /// Index bits consumed below this node (0 for a leaf, then 6, 12, ...).
    pub shift: u32,
    /// Number of non-zero slots.
    pub count: u32,
    /// Virtual address of the parent node (0 at the root).
    pub parent: u64,
    /// Slots, see above.
    pub slots: [u64; RADIX_FANOUT],
}

/// Size in bytes of a [`RadixNode`].
pub const RADIX_NODE_SIZE: usize = core::mem::size_of::<RadixNode>();

/// Ground-truth use of a frame ([`GroundTruth`] low byte).
pub mod frame_use {
    /// Free (in the allocator).
    pub const FREE: u8 = 0;
    /// Reserved boot structures below 1 MiB (boot info, GDT/IDT/TSS, boot page tables, stacks).
    pub const BOOT: u8 = 1;
    /// Kernel text.
    pub const KERNEL_TEXT: u8 = 2;
    /// Kernel data: rodata, data, bss, heap objects (process/file tables, radix nodes, the
    /// frame bitmap, device rings, buffers).
    pub const KERNEL_DATA: u8 = 3;
    /// A page-table page (any level, kernel or process).
    pub const PAGE_TABLE: u8 = 4;
    /// A page mapped executable into a user process (owner = pid). Page-cache pages of an
    /// executable that are mapped executable count here (owner = pid of the first mapper).
    pub const USER_CODE: u8 = 5;
    /// User anonymous memory: heap, stack, private copies of writable segments (owner = pid).
    pub const USER_DATA: u8 = 6;
    /// Page cache of a data file (owner = ino).
    pub const PAGE_CACHE_DATA: u8 = 7;
    /// Page cache of an executable, not mapped executable (owner = ino).
    pub const PAGE_CACHE_EXEC: u8 = 8;
    /// Number of uses (for tables).
    pub const COUNT: u8 = 9;
}

/// A ground-truth word: `use | owner << 8`.
pub type GroundTruth = u32;

/// Pack a ground-truth word.
pub const fn ground_truth(use_: u8, owner: u32) -> GroundTruth {
    use_ as u32 | (owner << 8)
}
