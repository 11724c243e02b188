//! The KInfo descriptor at `KINFO_GPA` (the kernel's self-description for outside readers).

use kscope_guest::abi::kinfo::{KInfo, KINFO_MAGIC, KINFO_VERSION};
use kscope_guest::abi::layout::{phys_to_virt, DIRECT_MAP_BASE, KERNEL_VIRT_BASE, KINFO_GPA};

fn k() -> &'static mut KInfo {
    // SAFETY: the KInfo page is reserved kernel memory at a fixed physical address,
    // direct-mapped; only the kernel writes it, from one vCPU.
    unsafe { &mut *(phys_to_virt(KINFO_GPA) as *mut KInfo) }
}

/// Kernel layout facts for [`init`].
pub struct Layout {
    /// Bytes of RAM.
    pub mem_bytes: u64,
    /// Physical address of the kernel PML4.
    pub kernel_pml4: u64,
    /// Text, rodata, data [start, end) virtual.
    pub text: (u64, u64),
    /// Rodata.
    pub rodata: (u64, u64),
    /// Data + bss.
    pub data: (u64, u64),
}

/// Clear the page and write the fixed fields (the frame fields come from `set_frames`).
pub fn init_header() {
    // SAFETY: the KInfo page is ours (see `k`); zero it whole.
    unsafe { crate::klib::memset(phys_to_virt(KINFO_GPA) as *mut u8, 0, 4096) };
    let d = k();
    d.magic = KINFO_MAGIC;
    d.version = KINFO_VERSION;
    d.size = core::mem::size_of::<KInfo>() as u32;
    d.direct_map_base = DIRECT_MAP_BASE;
    d.kernel_virt_base = KERNEL_VIRT_BASE;
}

/// Record the kernel layout.
pub fn set_layout(l: &Layout) {
    let d = k();
    d.mem_bytes = l.mem_bytes;
    d.kernel_pml4 = l.kernel_pml4;
    (d.text_start, d.text_end) = l.text;
    (d.rodata_start, d.rodata_end) = l.rodata;
    (d.data_start, d.data_end) = l.data;
}

/// Record the template of the user-mode page tables (native mode's isolation).
pub fn set_user_template(pml4: u64) {
    k().user_pml4_template = pml4;
}

/// Record the frame allocator's tables.
pub fn set_frames(bitmap: u64, count: u64, free: u64, ground_truth: u64) {
    let d = k();
    d.frame_bitmap = bitmap;
    d.frame_count = count;
    d.free_frames = free;
    d.ground_truth = ground_truth;
}

/// Update the free-frame count.
pub fn set_free_frames(n: u64) {
    k().free_frames = n;
}

/// Record the process and file tables.
pub fn set_tables(
    proc_table: u64,
    proc_max: u32,
    proc_stride: u32,
    file_table: u64,
    file_max: u32,
    file_stride: u32,
) {
    let d = k();
    d.proc_table = proc_table;
    d.proc_max = proc_max;
    d.proc_stride = proc_stride;
    d.file_table = file_table;
    d.file_max = file_max;
    d.file_stride = file_stride;
}

/// Record the last clone generation seen.
pub fn set_generation(g: u64) {
    k().seen_generation = g;
}

/// Count one SIGCLONE delivery.
pub fn count_sigclone() {
    k().sigclone_count += 1;
}
