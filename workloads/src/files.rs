//! How workload logic reaches the root file system.
//!
//! The guest programs implement [`Files`] with `kscope_guest::ulib` (mmap of page-cache pages,
//! `pread`); host tests implement it over the files the data generators produce (the same bytes
//! the image holds), so the very same engine code runs on both sides.

use alloc::string::String;

/// Errors reaching a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The file does not exist in the image.
    #[error("no such file {0:?}: rebuild the image with the workload's data files")]
    NotFound(String),
    /// The kernel refused the operation.
    #[error("{op} of {path:?} failed with errno {errno}")]
    Sys {
        /// The operation (`open`, `mmap`, `pread`).
        op: &'static str,
        /// The file.
        path: String,
        /// The kernel's errno.
        errno: i64,
    },
    /// The file's contents are not in the expected layout.
    #[error("file {0:?} is malformed: regenerate it with kscope_workloads::data")]
    Malformed(String),
}

/// Read-only access to the files of the image.
pub trait Files {
    /// The whole file, mapped read-only for the rest of the process's life (the guest maps
    /// page-cache pages; touching the slice faults them in).
    fn map(&mut self, path: &str) -> Result<&'static [u8], FileError>;

    /// Read `buf.len()` bytes at `offset` (fewer at end of file) through the page cache.
    fn read_at(&mut self, path: &str, offset: u64, buf: &mut [u8]) -> Result<usize, FileError>;

    /// Size of the file in bytes.
    fn size(&mut self, path: &str) -> Result<u64, FileError>;
}

/// Host implementation over an in-memory set of files (used by tests and the host-side
/// engine runs); file contents are leaked to get the `'static` lifetime of a mapping.
#[cfg(not(feature = "guest-bins"))]
#[derive(Default, Clone)]
pub struct MemFiles {
    files: std::collections::HashMap<String, &'static [u8]>,
}

#[cfg(not(feature = "guest-bins"))]
impl MemFiles {
    /// Files from `(path, contents)` pairs.
    pub fn new(files: impl IntoIterator<Item = (String, alloc::vec::Vec<u8>)>) -> Self {
        MemFiles {
            files: files
                .into_iter()
                .map(|(p, d)| (p, &*alloc::boxed::Box::leak(d.into_boxed_slice())))
                .collect(),
        }
    }

    /// Files from contents that live for the whole program.
    pub fn from_static(files: impl IntoIterator<Item = (String, &'static [u8])>) -> Self {
        MemFiles {
            files: files.into_iter().collect(),
        }
    }

    fn get(&self, path: &str) -> Result<&'static [u8], FileError> {
        self.files
            .get(path)
            .copied()
            .ok_or_else(|| FileError::NotFound(path.into()))
    }
}

#[cfg(not(feature = "guest-bins"))]
impl Files for MemFiles {
    fn map(&mut self, path: &str) -> Result<&'static [u8], FileError> {
        self.get(path)
    }

    fn read_at(&mut self, path: &str, offset: u64, buf: &mut [u8]) -> Result<usize, FileError> {
        let data = self.get(path)?;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn size(&mut self, path: &str) -> Result<u64, FileError> {
        Ok(self.get(path)?.len() as u64)
    }
}
