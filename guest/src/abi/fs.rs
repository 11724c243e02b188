//! On-disk format of the read-only root file system (KSFS), served by virtio-blk.
//!
//! ```text
//! offset 0              FsSuper (one 4 KiB block)
//! super.table_offset    file_count x FsEntry (128 bytes each)
//! entry.offset          file contents, each starting on a 4 KiB boundary
//! ```
//! All integers little-endian. Sectors are 512 bytes; the kernel reads whole 4 KiB pages.

/// Magic of [`FsSuper`].
pub const FS_MAGIC: [u8; 8] = *b"KSCOPEFS";
/// Format version.
pub const FS_VERSION: u32 = 1;
/// Block size: file data is aligned to it.
pub const FS_BLOCK: u64 = 4096;
/// Disk sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Longest path, including NUL padding.
pub const NAME_MAX: usize = 64;

/// Superblock at offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FsSuper {
    /// [`FS_MAGIC`].
    pub magic: [u8; 8],
    /// [`FS_VERSION`].
    pub version: u32,
    /// Number of [`FsEntry`] records.
    pub file_count: u32,
    /// Byte offset of the entry table.
    pub table_offset: u64,
    /// Total image size in bytes (a multiple of [`FS_BLOCK`]).
    pub total_size: u64,
}

/// One file.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FsEntry {
    /// Absolute path, NUL padded (e.g. `/bin/web`, `/data/lineitem.tbl`).
    pub name: [u8; NAME_MAX],
    /// Byte offset of the contents (a multiple of [`FS_BLOCK`]).
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// A [`crate::abi::kinfo::file_kind`] value.
    pub kind: u32,
    /// CRC-32 (IEEE) of the contents.
    pub crc32: u32,
    /// Reserved, zero.
    pub reserved: [u8; 40],
}

/// Size of an [`FsEntry`].
pub const FS_ENTRY_SIZE: usize = core::mem::size_of::<FsEntry>();
