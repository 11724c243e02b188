//! Versioned on-disk snapshot container.
//!
//! A snapshot is two files:
//! - a **state file**: a 32-byte header (magic, format version, body length, CRC-32) and a
//!   body holding the memory file's description and an opaque payload (the VMM's vCPU and
//!   device state, raw bytes or any serde type, stored as JSON);
//! - a **memory file**: guest page `n` at offset `n * 4096`, only non-zero pages written, so
//!   zero pages are holes (read back with [`FileImage`], lazily or eagerly).
//!
//! Writes are atomic: both files are written to temporary names, fsynced, then renamed (memory
//! first, state last: the state file is the commit record) and the directory fsynced. A full
//! disk gives [`SnapError::NoSpace`] and leaves no partial file behind. Reads validate magic,
//! version, length and checksum before returning anything.
//!
//! Header layout (little endian): `magic[8] = "KSCOPESN"`, `version: u32`, `flags: u32 = 0`,
//! `body_len: u64`, `crc32: u32` (over the whole file except these 4 bytes), `reserved: u32`.
//! Body v1: `mem_pages: u64`, `mem_data_pages: u64`, `mem_crc: u32`, `reserved: u32`, payload.
//! Body v2 (written now): the v1 fixed part, then `page_crc: [u32; mem_pages]` (CRC-32 of
//! every guest page as it reads back, holes included), then the payload. The page table lets
//! a lazy restore check each page when it is first fetched ([`VerifiedImage`]); version 1
//! files are still read, and their memory is verified in one pass before use.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::lazy::{
    page_crc, zero_page_crc, FileImage, LazyError, PageSource, VerifiedImage, PAGE_SIZE,
};

/// Magic bytes at the start of a state file.
pub const MAGIC: [u8; 8] = *b"KSCOPESN";
/// Format version this code writes (it also reads [`FORMAT_V1`]).
pub const FORMAT_VERSION: u32 = 2;
/// The first format: no per-page checksums (memory verified whole on open).
pub const FORMAT_V1: u32 = 1;
const HEADER_LEN: usize = 32;
const BODY_FIXED: usize = 24;
/// Largest body accepted on read (guards against absurd lengths in a damaged header).
const MAX_BODY: u64 = 1 << 32;
/// Pages per write of the memory file.
const WRITE_RUN: usize = 64;

/// Errors of the snapshot container.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file system is full; partial files were removed.
    #[error("no space left writing {}: free space or choose another directory (partial files were removed)", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// Not a kscope state file.
    #[error("{} is not a kscope snapshot state file (magic {found:02x?}, expected {MAGIC:02x?})", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Magic bytes found.
        found: [u8; 8],
    },
    /// Written by another format version.
    #[error("{} has snapshot format version {found}, this build reads versions 1 to {supported}; take the snapshot again with this build", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{} is truncated or damaged: {expected} bytes expected, {actual} found", path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// Bytes the header announces (or the header size).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The checksum does not match: the file is corrupted.
    #[error("{} is corrupted: CRC-32 {computed:#010x} does not match the stored {stored:#010x}", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Stored checksum.
        stored: u32,
        /// Checksum of the contents.
        computed: u32,
    },
    /// The memory file does not match the state file.
    #[error("memory file {} does not match its state file: {what}", path.display())]
    MemoryMismatch {
        /// The memory file.
        path: PathBuf,
        /// The discrepancy.
        what: String,
    },
    /// The payload could not be (de)serialized.
    #[error("snapshot payload (de)serialization failed: {0}")]
    Payload(#[from] serde_json::Error),
    /// Reading guest memory failed.
    #[error(transparent)]
    Memory(#[from] LazyError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, SnapError>;

/// The two files of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The state file.
    pub state: PathBuf,
    /// The sparse memory file.
    pub memory: PathBuf,
}

impl SnapshotPaths {
    /// `state.ksnap` and `memory.kmem` inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join("state.ksnap"),
            memory: dir.join("memory.kmem"),
        }
    }
}

/// Description of the memory file recorded in the state file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryInfo {
    /// Guest pages (the memory file is this many pages long).
    pub pages: u64,
    /// Non-zero pages written.
    pub data_pages: u64,
    /// CRC-32 over (gfn as u64 LE, page bytes) of every written page, in order.
    pub crc: u32,
}

/// A validated state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateFile {
    /// Format version of the file.
    pub version: u32,
    /// The memory file's description.
    pub memory: MemoryInfo,
    /// CRC-32 of every page (version 2; `None` for version 1 files).
    pub page_crcs: Option<Vec<u32>>,
    /// The opaque payload.
    pub payload: Vec<u8>,
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            SnapError::NoSpace {
                path: path.to_path_buf(),
            }
        } else {
            SnapError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// A temporary file beside its final path, removed on drop unless committed.
struct TempFile {
    tmp: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(final_path: &Path) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = final_path.with_file_name(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_at("create", &tmp))?;
        Ok(Self {
            tmp,
            file: Some(file),
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("open until committed")
    }

    fn sync(&self) -> Result<()> {
        self.file().sync_all().map_err(io_at("fsync", &self.tmp))
    }

    fn commit(mut self, final_path: &Path) -> Result<()> {
        self.file = None;
        std::fs::rename(&self.tmp, final_path).map_err(io_at("rename to", final_path))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("fsync directory", dir))
}

fn encode_state(memory: &MemoryInfo, page_crcs: &[u32], payload: &[u8]) -> Vec<u8> {
    let body_len = (BODY_FIXED + 4 * page_crcs.len() + payload.len()) as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + body_len as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // crc + reserved, filled below
    out.extend_from_slice(&memory.pages.to_le_bytes());
    out.extend_from_slice(&memory.data_pages.to_le_bytes());
    out.extend_from_slice(&memory.crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for c in page_crcs {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(payload);
    let crc = state_crc(&out);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

fn state_crc(file: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&file[..24]);
    h.update(&file[28..]);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and validates a state file image.
fn decode_state(path: &Path, bytes: &[u8]) -> Result<StateFile> {
    let actual = bytes.len() as u64;
    if bytes.len() < 12 {
        return Err(SnapError::Length {
            path: path.into(),
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    let found: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if found != MAGIC {
        return Err(SnapError::BadMagic {
            path: path.into(),
            found,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION && version != FORMAT_V1 {
        return Err(SnapError::UnsupportedVersion {
            path: path.into(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapError::Length {
            path: path.into(),
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    let body_len = u64_at(bytes, 16);
    let expected = HEADER_LEN as u64 + body_len;
    if body_len < BODY_FIXED as u64 || body_len > MAX_BODY || expected != actual {
        return Err(SnapError::Length {
            path: path.into(),
            expected,
            actual,
        });
    }
    let stored = u32_at(bytes, 24);
    let computed = state_crc(bytes);
    if stored != computed {
        return Err(SnapError::Checksum {
            path: path.into(),
            stored,
            computed,
        });
    }
    let b = &bytes[HEADER_LEN..];
    let memory = MemoryInfo {
        pages: u64_at(b, 0),
        data_pages: u64_at(b, 8),
        crc: u32_at(b, 16),
    };
    let (page_crcs, payload_at) = if version == FORMAT_V1 {
        (None, BODY_FIXED)
    } else {
        let table = memory
            .pages
            .checked_mul(4)
            .filter(|&t| t <= body_len - BODY_FIXED as u64)
            .ok_or_else(|| SnapError::Length {
                path: path.into(),
                expected: HEADER_LEN as u64 + BODY_FIXED as u64 + memory.pages.saturating_mul(4),
                actual,
            })? as usize;
        let crcs = b[BODY_FIXED..BODY_FIXED + table]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        (Some(crcs), BODY_FIXED + table)
    };
    Ok(StateFile {
        version,
        memory,
        page_crcs,
        payload: b[payload_at..].to_vec(),
    })
}

/// Reads and validates a state file.
pub fn read_state(path: &Path) -> Result<StateFile> {
    let mut f = File::open(path).map_err(io_at("open", path))?;
    let len = f.metadata().map_err(io_at("stat", path))?.len();
    if len > HEADER_LEN as u64 + MAX_BODY {
        return Err(SnapError::Length {
            path: path.into(),
            expected: HEADER_LEN as u64 + MAX_BODY,
            actual: len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes).map_err(io_at("read", path))?;
    decode_state(path, &bytes)
}

/// Writes a state file without a memory file (atomically).
pub fn write_state(path: &Path, payload: &[u8]) -> Result<()> {
    let tmp = TempFile::create(path)?;
    tmp.file()
        .write_all(&encode_state(&MemoryInfo::default(), &[], payload))
        .map_err(io_at("write", &tmp.tmp))?;
    tmp.sync()?;
    tmp.commit(path)?;
    sync_dir(path)
}

/// Replaces the payload of an existing state file (atomically), keeping its memory record
/// and page table, with a valid checksum. For tools and tests that edit a snapshot's state.
pub fn rewrite_payload(path: &Path, payload: &[u8]) -> Result<()> {
    let old = read_state(path)?;
    let tmp = TempFile::create(path)?;
    tmp.file()
        .write_all(&encode_state(
            &old.memory,
            old.page_crcs.as_deref().unwrap_or(&[]),
            payload,
        ))
        .map_err(io_at("write", &tmp.tmp))?;
    tmp.sync()?;
    tmp.commit(path)?;
    sync_dir(path)
}

/// Writes the non-zero pages of `memory` into a fresh sparse temporary file; returns its
/// description and the CRC-32 of every page.
fn write_memory(tmp: &TempFile, memory: &dyn PageSource) -> Result<(MemoryInfo, Vec<u32>)> {
    let f = tmp.file();
    let pages = memory.pages();
    f.set_len(pages * PAGE_SIZE as u64)
        .map_err(io_at("size", &tmp.tmp))?;
    let mut info = MemoryInfo {
        pages,
        ..Default::default()
    };
    let mut crc = crc32fast::Hasher::new();
    let mut run: Vec<u8> = Vec::with_capacity(WRITE_RUN * PAGE_SIZE);
    let mut run_start = 0u64;
    let mut page = [0u8; PAGE_SIZE];
    let mut crcs = Vec::with_capacity(pages as usize);
    let flush = |run: &mut Vec<u8>, start: u64| -> Result<()> {
        if !run.is_empty() {
            f.write_all_at(run, start * PAGE_SIZE as u64)
                .map_err(io_at("write", &tmp.tmp))?;
            run.clear();
        }
        Ok(())
    };
    for g in 0..pages {
        let zero = memory.is_known_zero(g) || {
            memory.read_page(g, &mut page)?;
            page.iter().all(|&b| b == 0)
        };
        if zero {
            crcs.push(zero_page_crc());
            flush(&mut run, run_start)?;
            continue;
        }
        crcs.push(page_crc(&page));
        if run.is_empty() {
            run_start = g;
        }
        crc.update(&g.to_le_bytes());
        crc.update(&page);
        run.extend_from_slice(&page);
        info.data_pages += 1;
        if run.len() == WRITE_RUN * PAGE_SIZE {
            flush(&mut run, run_start)?;
        }
    }
    flush(&mut run, run_start)?;
    tmp.sync()?;
    info.crc = crc.finalize();
    Ok((info, crcs))
}

/// Writes a snapshot: the sparse memory file of `memory` and a state file holding
/// `payload`. Atomic per file, state last; on any error nothing new is left behind.
pub fn write_snapshot_bytes(
    paths: &SnapshotPaths,
    payload: &[u8],
    memory: &dyn PageSource,
) -> Result<MemoryInfo> {
    let mem_tmp = TempFile::create(&paths.memory)?;
    let (info, crcs) = write_memory(&mem_tmp, memory)?;
    let state_tmp = TempFile::create(&paths.state)?;
    state_tmp
        .file()
        .write_all(&encode_state(&info, &crcs, payload))
        .map_err(io_at("write", &state_tmp.tmp))?;
    state_tmp.sync()?;
    mem_tmp.commit(&paths.memory)?;
    if let Err(e) = state_tmp.commit(&paths.state) {
        let _ = std::fs::remove_file(&paths.memory);
        return Err(e);
    }
    sync_dir(&paths.state)?;
    sync_dir(&paths.memory)?;
    Ok(info)
}

/// [`write_snapshot_bytes`] with a serde payload (stored as JSON).
pub fn write_snapshot<T: Serialize>(
    paths: &SnapshotPaths,
    state: &T,
    memory: &dyn PageSource,
) -> Result<MemoryInfo> {
    write_snapshot_bytes(paths, &serde_json::to_vec(state)?, memory)
}

/// Opens a snapshot: validates the state file, then checks that the memory file has the
/// recorded size and opens it as a page source. Returns the raw payload.
pub fn open_snapshot_bytes(paths: &SnapshotPaths) -> Result<(Vec<u8>, MemoryInfo, FileImage)> {
    let (state, image) = open_parts(paths)?;
    Ok((state.payload, state.memory, image))
}

fn open_parts(paths: &SnapshotPaths) -> Result<(StateFile, FileImage)> {
    let state = read_state(&paths.state)?;
    let len = std::fs::metadata(&paths.memory)
        .map_err(io_at("stat", &paths.memory))?
        .len();
    let want = state.memory.pages * PAGE_SIZE as u64;
    if len != want {
        return Err(SnapError::MemoryMismatch {
            path: paths.memory.clone(),
            what: format!("{len} bytes, the state file records {want}"),
        });
    }
    let image = FileImage::open(&paths.memory, Some(state.memory.pages))?;
    Ok((state, image))
}

/// Opens a snapshot whose memory is checked as it is read: with a version 2 state file, each
/// page against its recorded CRC-32 when it is first read (a lazy restore stays lazy); with a
/// version 1 file, the whole memory file now ([`verify_memory`]). A page that fails its check
/// gives [`LazyError::Corrupt`] naming the memory file, never its data.
pub fn open_snapshot_verified<T: DeserializeOwned>(
    paths: &SnapshotPaths,
) -> Result<(T, MemoryInfo, Arc<dyn PageSource>)> {
    let v = open_snapshot_bytes_verified(paths)?;
    Ok((serde_json::from_slice(&v.payload)?, v.memory, v.image))
}

/// A snapshot opened by [`open_snapshot_bytes_verified`].
pub struct VerifiedSnapshot {
    /// The raw payload.
    pub payload: Vec<u8>,
    /// The memory file's description.
    pub memory: MemoryInfo,
    /// True if the state file holds a CRC-32 per page (format 2): pages are checked as read.
    pub page_table: bool,
    /// The memory, checked as it is read.
    pub image: Arc<dyn PageSource>,
}

/// [`open_snapshot_verified`] with the raw payload, and whether the file had a page table.
pub fn open_snapshot_bytes_verified(paths: &SnapshotPaths) -> Result<VerifiedSnapshot> {
    let (state, image) = open_parts(paths)?;
    let page_table = state.page_crcs.is_some();
    let image: Arc<dyn PageSource> = match state.page_crcs {
        Some(crcs) => Arc::new(VerifiedImage::new(
            Arc::new(image),
            crcs.into(),
            paths.memory.display().to_string(),
        )?),
        None => {
            verify_memory(&state.memory, &image, &paths.memory)?;
            Arc::new(image)
        }
    };
    Ok(VerifiedSnapshot {
        payload: state.payload,
        memory: state.memory,
        page_table,
        image,
    })
}

/// Removes what an interrupted writer (a process killed during [`write_snapshot`]) left in
/// `dir`: `.<name>.tmp-<pid>-<n>` files of processes that no longer run, and `.<name>.tmp`
/// files (written by a snapshot's blob writer, which runs only while the caller holds the
/// directory). Returns the removed paths.
pub fn clean_leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let stale = if name.ends_with(".tmp") {
            true
        } else if let Some((_, tail)) = name.rsplit_once(".tmp-") {
            match tail.split('-').next().and_then(|p| p.parse::<i32>().ok()) {
                Some(pid) => !process_alive(pid),
                None => false,
            }
        } else {
            false
        };
        if stale && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if pid as u32 == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// [`open_snapshot_bytes`] with a serde payload.
pub fn open_snapshot<T: DeserializeOwned>(
    paths: &SnapshotPaths,
) -> Result<(T, MemoryInfo, FileImage)> {
    let (payload, info, image) = open_snapshot_bytes(paths)?;
    Ok((serde_json::from_slice(&payload)?, info, image))
}

/// Reads every data page of a memory file and checks it against the state file's record
/// (count and CRC). Costs a full read: use it for integrity checks, not on the restore path.
pub fn verify_memory(info: &MemoryInfo, image: &FileImage, path: &Path) -> Result<()> {
    let mut crc = crc32fast::Hasher::new();
    let mut page = [0u8; PAGE_SIZE];
    let mut data = 0u64;
    for g in 0..info.pages {
        if image.is_known_zero(g) {
            continue;
        }
        image.read_page(g, &mut page)?;
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        crc.update(&g.to_le_bytes());
        crc.update(&page);
        data += 1;
    }
    let computed = crc.finalize();
    if data != info.data_pages || computed != info.crc {
        return Err(SnapError::MemoryMismatch {
            path: path.to_path_buf(),
            what: format!(
                "{data} data pages with CRC {computed:#010x}, recorded {} with {:#010x}",
                info.data_pages, info.crc
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::MemfdImage;

    fn scratch(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "kscope-snap-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// 64 pages; pages 0, 5 and 40..48 hold data, the rest are zero.
    fn memory() -> MemfdImage {
        let mut b = vec![0u8; 64 * PAGE_SIZE];
        for g in [0usize, 5].into_iter().chain(40..48) {
            for (i, x) in b[g * PAGE_SIZE..(g + 1) * PAGE_SIZE].iter_mut().enumerate() {
                *x = (g * 31 + i % 253) as u8 | 1;
            }
        }
        MemfdImage::from_bytes(&b).unwrap()
    }

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Vcpu {
        rip: u64,
        regs: Vec<u64>,
        name: String,
    }

    fn sample() -> Vcpu {
        Vcpu {
            rip: 0xffff_8000_0010_0000,
            regs: (0..16).collect(),
            name: "vcpu0".into(),
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn snapshot_round_trip_is_sparse_and_exact() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("rt");
        let paths = SnapshotPaths::in_dir(&dir);
        let mem = memory();
        let info = write_snapshot(&paths, &sample(), &mem).unwrap();
        assert_eq!((info.pages, info.data_pages), (64, 10));
        assert_eq!(
            listing(&dir),
            vec!["memory.kmem", "state.ksnap"],
            "no temporary files left"
        );
        let (state, info2, image): (Vcpu, _, _) = open_snapshot(&paths).unwrap();
        assert_eq!(state, sample());
        assert_eq!(info2, info);
        let (mut a, mut b) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        for g in 0..64 {
            mem.read_page(g, &mut a).unwrap();
            image.read_page(g, &mut b).unwrap();
            assert_eq!(a, b, "page {g}");
        }
        assert_eq!(image.data_pages().count(), 10, "zero pages must be holes");
        let blocks =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&paths.memory).unwrap());
        assert!(
            blocks * 512 < 64 * PAGE_SIZE as u64 / 2,
            "memory file is not sparse: {blocks} blocks"
        );
        verify_memory(&info, &image, &paths.memory).unwrap();
        // Overwrite in place.
        write_snapshot_bytes(&paths, b"second", &mem).unwrap();
        assert_eq!(open_snapshot_bytes(&paths).unwrap().0, b"second");
        assert_eq!(listing(&dir).len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damaged_state_files_are_rejected_with_specific_errors() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("bad");
        let path = dir.join("s");
        write_state(&path, b"payload bytes").unwrap();
        let good = std::fs::read(&path).unwrap();
        assert_eq!(read_state(&path).unwrap().payload, b"payload bytes");
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_state(&path).unwrap_err()
        };
        // Every single flipped byte of header or body is detected.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            let e = check(&b);
            match i {
                0..=7 => assert!(matches!(e, SnapError::BadMagic { .. }), "byte {i}: {e}"),
                8..=11 => assert!(
                    matches!(e, SnapError::UnsupportedVersion { .. }),
                    "byte {i}: {e}"
                ),
                16..=23 => assert!(matches!(e, SnapError::Length { .. }), "byte {i}: {e}"),
                _ => assert!(matches!(e, SnapError::Checksum { .. }), "byte {i}: {e}"),
            }
        }
        let mut b = good.clone();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = check(&b);
        assert!(matches!(
            e,
            SnapError::UnsupportedVersion {
                found: 7,
                supported: FORMAT_VERSION,
                ..
            }
        ));
        assert!(
            e.to_string().contains("version 7") && e.to_string().contains("versions 1 to 2"),
            "{e}"
        );
        for cut in [0, 5, 20, good.len() - 1] {
            assert!(
                matches!(check(&good[..cut]), SnapError::Length { .. }),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(check(&long), SnapError::Length { .. }));
        assert!(matches!(
            check(b"not a snapshot at all, really"),
            SnapError::BadMagic { .. }
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_file_mismatches_are_detected() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("mem");
        let paths = SnapshotPaths::in_dir(&dir);
        let info = write_snapshot_bytes(&paths, b"x", &memory()).unwrap();
        // A flipped byte inside a data page: caught by verify_memory.
        let f = OpenOptions::new().write(true).open(&paths.memory).unwrap();
        f.write_all_at(&[0xEE], 5 * PAGE_SIZE as u64 + 7).unwrap();
        let (_, _, image) = open_snapshot_bytes(&paths).unwrap();
        assert!(matches!(
            verify_memory(&info, &image, &paths.memory),
            Err(SnapError::MemoryMismatch { .. })
        ));
        // A truncated memory file: caught on open.
        f.set_len(10 * PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            open_snapshot_bytes(&paths),
            Err(SnapError::MemoryMismatch { .. })
        ));
        // A corrupted state file: nothing is returned.
        let mut s = std::fs::read(&paths.state).unwrap();
        let last = s.len() - 1;
        s[last] ^= 1;
        std::fs::write(&paths.state, s).unwrap();
        assert!(matches!(
            open_snapshot_bytes(&paths),
            Err(SnapError::Checksum { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn version_1_files_are_read_and_verified_whole() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("v1");
        let paths = SnapshotPaths::in_dir(&dir);
        let info = write_snapshot(&paths, &sample(), &memory()).unwrap();
        // Rewrite the state file as version 1: no page table.
        let mut v1 = encode_state(&info, &[], &serde_json::to_vec(&sample()).unwrap());
        v1[8..12].copy_from_slice(&FORMAT_V1.to_le_bytes());
        let crc = state_crc(&v1);
        v1[24..28].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&paths.state, &v1).unwrap();
        let st = read_state(&paths.state).unwrap();
        assert_eq!((st.version, st.page_crcs.is_none()), (1, true));
        let (v, _, image): (Vcpu, _, _) = open_snapshot_verified(&paths).unwrap();
        assert_eq!(v, sample());
        let mut page = [0u8; PAGE_SIZE];
        image.read_page(5, &mut page).unwrap();
        // A damaged v1 memory file is refused on open.
        let f = OpenOptions::new().write(true).open(&paths.memory).unwrap();
        f.write_all_at(&[0xEE], 41 * PAGE_SIZE as u64).unwrap();
        let Err(e) = open_snapshot_verified::<Vcpu>(&paths) else {
            panic!("a damaged version 1 memory file was accepted");
        };
        assert!(matches!(e, SnapError::MemoryMismatch { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn version_2_checks_each_page_when_read() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("v2");
        let paths = SnapshotPaths::in_dir(&dir);
        write_snapshot(&paths, &sample(), &memory()).unwrap();
        let st = read_state(&paths.state).unwrap();
        assert_eq!(st.version, FORMAT_VERSION);
        assert_eq!(st.page_crcs.as_ref().map(Vec::len), Some(64));
        let f = OpenOptions::new().write(true).open(&paths.memory).unwrap();
        // Page 41 gets a flipped byte; page 20 (a hole) gets data.
        f.write_all_at(&[0xEE], 41 * PAGE_SIZE as u64 + 9).unwrap();
        f.write_all_at(&[0x01], 20 * PAGE_SIZE as u64).unwrap();
        // Opening stays cheap: nothing is read yet.
        let (_, _, image): (Vcpu, _, _) = open_snapshot_verified(&paths).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        image.read_page(0, &mut page).unwrap();
        image.read_page(40, &mut page).unwrap();
        for bad in [41, 20] {
            let e = image.read_page(bad, &mut page).unwrap_err();
            assert!(
                matches!(&e, LazyError::Corrupt { gfn, path, .. } if *gfn == bad && path.ends_with("memory.kmem")),
                "{e}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn leftovers_of_dead_writers_are_removed() {
        let dir = scratch("left");
        let dead = ".memory.kmem.tmp-999999999-0";
        let mine = format!(".memory.kmem.tmp-{}-7", std::process::id());
        for n in [
            dead,
            ".kernel.elf.tmp",
            mine.as_str(),
            "memory.kmem",
            ".keep",
        ] {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        let mut removed: Vec<String> = clean_leftovers(&dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(removed, vec![".kernel.elf.tmp", dead]);
        assert_eq!(listing(&dir), vec![".keep", mine.as_str(), "memory.kmem"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Mounts a 256 KiB tmpfs (root needed) and fills it.
    #[test]
    fn full_disk_gives_no_space_and_leaves_nothing() {
        let _g = crate::lazy::tests::fd_guard();
        let dir = scratch("full");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=256k",
                "kscope-test",
                dir.to_str().unwrap(),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs (needs root)");
            return;
        }
        let paths = SnapshotPaths::in_dir(&dir);
        let big = MemfdImage::from_bytes(&vec![0x5A; 512 * 1024]).unwrap();
        let e = write_snapshot_bytes(&paths, b"s", &big).unwrap_err();
        let after_mem = listing(&dir);
        // The memory fits but the state does not.
        let e2 = write_snapshot_bytes(&paths, &vec![1u8; 300 * 1024], &memory()).unwrap_err();
        let after_state = listing(&dir);
        let e3 = write_state(&dir.join("s"), &vec![1u8; 300 * 1024]).unwrap_err();
        let after_plain = listing(&dir);
        let _ = std::process::Command::new("umount").arg(&dir).status();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(e, SnapError::NoSpace { .. }), "{e}");
        assert!(matches!(e2, SnapError::NoSpace { .. }), "{e2}");
        assert!(matches!(e3, SnapError::NoSpace { .. }), "{e3}");
        assert!(
            after_mem.is_empty() && after_state.is_empty() && after_plain.is_empty(),
            "{after_mem:?} {after_state:?} {after_plain:?}"
        );
    }
}
