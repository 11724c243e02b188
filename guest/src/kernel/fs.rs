//! The read-only root file system (KSFS, `abi::fs`): mounted from the block device at boot
//! into the in-memory file table (entries start with `abi::kinfo::FileAbi`), whose page cache
//! lives in [`crate::pagecache`].

use kscope_guest::abi::fs::{FsEntry, FsSuper, FS_BLOCK, FS_ENTRY_SIZE, FS_MAGIC, FS_VERSION};
use kscope_guest::abi::kinfo::{file_kind, frame_use, FileAbi};
use kscope_guest::abi::{from_bytes, layout::PAGE_SIZE};

use crate::arch::KCell;
use crate::blk;
use crate::mm::{frame, va};

/// Capacity of the file table.
pub const FILE_MAX: usize = 256;

/// An in-memory inode: the ABI prefix, then private fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEntry {
    /// Published part (read by the colorer).
    pub abi: FileAbi,
    /// Byte offset of the contents on the disk.
    pub disk_offset: u64,
    /// CRC-32 recorded in the image.
    pub crc32: u32,
    /// Padding.
    /// FNV-1a hash of the name (the lookup index key).
    pub hash: u32,
}

const EMPTY: FileEntry = FileEntry {
    abi: FileAbi {
        kind: file_kind::NONE,
        ino: 0,
        size: 0,
        radix_root: 0,
        nr_cached: 0,
        name: [0; 64],
    },
    disk_offset: 0,
    crc32: 0,
    hash: 0,
};

/// The file table.
pub struct FileTable {
    /// Entries (`count` used).
    pub files: [FileEntry; FILE_MAX],
    /// Number of files.
    pub count: usize,
    /// Open-addressing index by name hash: 0 = empty, `i + 1` = file `i`. The kernel runs
    /// under KVM's instruction emulator on PVM hosts (docs/PERFORMANCE-NOTES.md), so a lookup
    /// must touch a few entries, not scan every name.
    pub index: [u16; INDEX_SLOTS],
}

/// Slots of the name index (a power of two, at least twice FILE_MAX).
const INDEX_SLOTS: usize = 2 * FILE_MAX;

/// FNV-1a over a path.
fn name_hash(path: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in path {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

static FILES: KCell<FileTable> = KCell::new(FileTable {
    files: [EMPTY; FILE_MAX],
    count: 0,
    index: [0; INDEX_SLOTS],
});

/// Why the root file system could not be mounted.
#[derive(Debug, Clone, Copy)]
pub enum FsError {
    /// Reading the disk failed.
    Io,
    /// Bad magic or version.
    BadSuper,
    /// A file entry is invalid or the table is too large.
    BadEntry,
    /// Out of memory.
    NoMem,
}

/// Mount the root file system of a disk of `disk_bytes` bytes.
pub fn mount(disk_bytes: u64) -> Result<usize, FsError> {
    let tmp = frame::alloc(frame_use::KERNEL_DATA, 0).ok_or(FsError::NoMem)?;
    let r = mount_with(tmp, disk_bytes);
    frame::free(tmp);
    r
}

fn block(tmp: u64) -> &'static [u8] {
    // SAFETY: `tmp` is a frame we own, direct-mapped, 4096 bytes.
    unsafe { core::slice::from_raw_parts(va(tmp) as *const u8, PAGE_SIZE as usize) }
}

fn mount_with(tmp: u64, disk_bytes: u64) -> Result<usize, FsError> {
    blk::read(0, tmp, FS_BLOCK as u32).map_err(|_| FsError::Io)?;
    let sb: FsSuper = from_bytes(block(tmp)).ok_or(FsError::BadSuper)?;
    if sb.magic != FS_MAGIC || sb.version != FS_VERSION || sb.total_size > disk_bytes {
        return Err(FsError::BadSuper);
    }
    let n = sb.file_count as usize;
    if n > FILE_MAX {
        return Err(FsError::BadEntry);
    }
    let ft = FILES.get();
    let mut loaded = u64::MAX;
    for i in 0..n {
        let off = sb.table_offset + (i * FS_ENTRY_SIZE) as u64;
        let blk_off = off & !(FS_BLOCK - 1);
        if blk_off != loaded {
            blk::read(blk_off, tmp, FS_BLOCK as u32).map_err(|_| FsError::Io)?;
            loaded = blk_off;
        }
        let in_blk = (off - blk_off) as usize;
        if in_blk + FS_ENTRY_SIZE > FS_BLOCK as usize {
            return Err(FsError::BadEntry);
        }
        let e: FsEntry = from_bytes(&block(tmp)[in_blk..]).ok_or(FsError::BadEntry)?;
        let end = e.offset.checked_add(e.size).ok_or(FsError::BadEntry)?;
        if !e.offset.is_multiple_of(FS_BLOCK) || end > sb.total_size || e.name[0] != b'/' {
            return Err(FsError::BadEntry);
        }
        if e.kind != file_kind::EXEC && e.kind != file_kind::DATA {
            return Err(FsError::BadEntry);
        }
        let f = &mut ft.files[i];
        f.abi.kind = e.kind;
        f.abi.ino = i as u32;
        f.abi.size = e.size;
        f.abi.radix_root = 0;
        f.abi.nr_cached = 0;
        f.abi.name = e.name;
        f.disk_offset = e.offset;
        f.crc32 = e.crc32;
        f.hash = name_hash(&e.name[..name_len(&e.name)]);
        let mut slot = f.hash as usize & (INDEX_SLOTS - 1);
        while ft.index[slot] != 0 {
            slot = (slot + 1) & (INDEX_SLOTS - 1);
        }
        ft.index[slot] = i as u16 + 1;
    }
    ft.count = n;
    Ok(n)
}

/// Length of a NUL-padded name.
pub fn name_len(n: &[u8]) -> usize {
    n.iter().position(|&b| b == 0).unwrap_or(n.len())
}

/// Index of the file named `path`.
pub fn lookup(path: &[u8]) -> Option<usize> {
    let ft = FILES.get();
    let h = name_hash(path);
    let mut slot = h as usize & (INDEX_SLOTS - 1);
    loop {
        let i = ft.index[slot] as usize;
        if i == 0 {
            return None;
        }
        let f = &ft.files[i - 1];
        if f.hash == h {
            let n = &f.abi.name;
            if n.len() > path.len()
                && n[path.len()] == 0
                && crate::klib::bytes_eq(&n[..path.len()], path)
            {
                return Some(i - 1);
            }
        }
        slot = (slot + 1) & (INDEX_SLOTS - 1);
    }
}

/// The file with index `i` (callers pass indices from `lookup` or fds).
pub fn file(i: usize) -> &'static mut FileEntry {
    &mut FILES.get().files[i]
}

/// Number of files.
pub fn count() -> usize {
    FILES.get().count
}

/// Address of the file table (for KInfo).
pub fn table_addr() -> u64 {
    FILES.as_ptr() as u64
}
