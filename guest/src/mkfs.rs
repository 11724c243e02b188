//! Host-side builder of KSFS root file-system images (the format of [`crate::abi::fs`]).

use alloc::string::String;
use alloc::vec::Vec;

use crate::abi::fs::{FsEntry, FsSuper, FS_BLOCK, FS_ENTRY_SIZE, FS_MAGIC, FS_VERSION, NAME_MAX};
use crate::abi::kinfo::file_kind;

/// Errors building an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MkfsError {
    /// The path is empty, not absolute, or longer than the format allows.
    BadPath(String),
    /// Two files have the same path.
    Duplicate(String),
    /// The kind is not EXEC or DATA.
    BadKind(u32),
}

impl core::fmt::Display for MkfsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MkfsError::BadPath(p) => write!(
                f,
                "bad path {p:?}: paths must be absolute and at most {} bytes",
                NAME_MAX - 1
            ),
            MkfsError::Duplicate(p) => write!(f, "file {p:?} added twice"),
            MkfsError::BadKind(k) => write!(f, "file kind {k} is neither EXEC (1) nor DATA (2)"),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib) of `data`, bitwise (no tables, no SSE).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Builds an image from files added in order.
#[derive(Default)]
pub struct FsBuilder<'a> {
    files: Vec<(String, u32, &'a [u8])>,
}

impl<'a> FsBuilder<'a> {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a file (`kind` is [`file_kind::EXEC`] or [`file_kind::DATA`]).
    pub fn add(&mut self, path: &str, kind: u32, data: &'a [u8]) -> Result<&mut Self, MkfsError> {
        if !path.starts_with('/') || path.len() >= NAME_MAX || path.len() < 2 {
            return Err(MkfsError::BadPath(path.into()));
        }
        if kind != file_kind::EXEC && kind != file_kind::DATA {
            return Err(MkfsError::BadKind(kind));
        }
        if self.files.iter().any(|(p, _, _)| p == path) {
            return Err(MkfsError::Duplicate(path.into()));
        }
        self.files.push((path.into(), kind, data));
        Ok(self)
    }

    /// Lay out the image: superblock, entry table, then each file on a block boundary.
    pub fn build(&self) -> Vec<u8> {
        let table_offset = FS_BLOCK;
        let table_len = (self.files.len() * FS_ENTRY_SIZE) as u64;
        let mut offset = (table_offset + table_len).next_multiple_of(FS_BLOCK);
        let mut entries = Vec::with_capacity(self.files.len());
        for (path, kind, data) in &self.files {
            let mut name = [0u8; NAME_MAX];
            name[..path.len()].copy_from_slice(path.as_bytes());
            entries.push(FsEntry {
                name,
                offset,
                size: data.len() as u64,
                kind: *kind,
                crc32: crc32(data),
                reserved: [0; 40],
            });
            offset = (offset + data.len() as u64).next_multiple_of(FS_BLOCK);
        }
        let total = offset.max(FS_BLOCK * 2);
        let mut img = alloc::vec![0u8; total as usize];
        let sup = FsSuper {
            magic: FS_MAGIC,
            version: FS_VERSION,
            file_count: self.files.len() as u32,
            table_offset,
            total_size: total,
        };
        img[..core::mem::size_of::<FsSuper>()].copy_from_slice(crate::abi::as_bytes(&sup));
        for (i, (e, (_, _, data))) in entries.iter().zip(&self.files).enumerate() {
            let at = table_offset as usize + i * FS_ENTRY_SIZE;
            img[at..at + FS_ENTRY_SIZE].copy_from_slice(crate::abi::as_bytes(e));
            img[e.offset as usize..e.offset as usize + data.len()].copy_from_slice(data);
        }
        img
    }
}

/// Parse an image's file table (host-side check and tests): `(path, kind, bytes)`.
pub fn list(img: &[u8]) -> Option<Vec<(String, u32, &[u8])>> {
    let sup: FsSuper = crate::abi::from_bytes(img)?;
    if sup.magic != FS_MAGIC || sup.version != FS_VERSION || sup.total_size as usize > img.len() {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..sup.file_count as usize {
        let at = (sup.table_offset as usize).checked_add(i * FS_ENTRY_SIZE)?;
        let e: FsEntry = crate::abi::from_bytes(img.get(at..)?)?;
        let len = e.name.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
        let name = String::from_utf8(e.name[..len].to_vec()).ok()?;
        let start = e.offset as usize;
        let data = img.get(start..start.checked_add(e.size as usize)?)?;
        out.push((name, e.kind, data));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_and_alignment() {
        let big = alloc::vec![7u8; 10_000];
        let mut b = FsBuilder::new();
        b.add("/bin/a", file_kind::EXEC, b"\x7fELF").unwrap();
        b.add("/data/big", file_kind::DATA, &big).unwrap();
        let img = b.build();
        assert_eq!(img.len() as u64 % FS_BLOCK, 0);
        let files = list(&img).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "/bin/a");
        assert_eq!(files[1].2, &big[..]);
        for (_, _, data) in &files {
            let off = data.as_ptr() as usize - img.as_ptr() as usize;
            assert_eq!(off as u64 % FS_BLOCK, 0);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut b = FsBuilder::new();
        assert!(matches!(
            b.add("rel", file_kind::DATA, b""),
            Err(MkfsError::BadPath(_))
        ));
        assert!(matches!(b.add("/x", 9, b""), Err(MkfsError::BadKind(9))));
        b.add("/x", file_kind::DATA, b"").unwrap();
        assert!(matches!(
            b.add("/x", file_kind::DATA, b""),
            Err(MkfsError::Duplicate(_))
        ));
        assert!(list(b"garbage").is_none());
    }
}
