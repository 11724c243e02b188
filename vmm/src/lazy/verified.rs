//! A page source whose every page is checked against a CRC-32 recorded when the image was
//! written (a snapshot's per-page checksum table).
//!
//! The check happens when a page is read, so a lazily restored VM stays lazy: a page that is
//! never touched is never read or checked, and a page that fails its check is never handed to
//! anyone ([`LazyError::Corrupt`]). The fault server fails the VM that touched it instead of
//! installing wrong data.

use std::sync::Arc;

use super::{LazyError, PageSource, Result, PAGE_SIZE};
use crate::prefetch::Gfn;

/// CRC-32 of a page of zeros (what a hole in a sparse memory file reads as).
pub fn zero_page_crc() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| crc32fast::hash(&[0u8; PAGE_SIZE]))
}

/// CRC-32 of one page, as recorded in a snapshot's page table.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// `inner` with per-page checksums.
pub struct VerifiedImage {
    inner: Arc<dyn PageSource>,
    crcs: Arc<[u32]>,
    label: String,
}

impl std::fmt::Debug for VerifiedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedImage")
            .field("pages", &self.crcs.len())
            .field("label", &self.label)
            .finish()
    }
}

impl VerifiedImage {
    /// Wraps `inner`; `crcs[g]` is the CRC-32 of page `g`, `label` names the image in errors
    /// (the snapshot's memory file).
    pub fn new(inner: Arc<dyn PageSource>, crcs: Arc<[u32]>, label: String) -> Result<Self> {
        if crcs.len() as u64 != inner.pages() {
            return Err(LazyError::Size(format!(
                "{label}: {} page checksums for {} pages",
                crcs.len(),
                inner.pages()
            )));
        }
        Ok(Self { inner, crcs, label })
    }

    fn check(&self, gfn: Gfn, page: &[u8]) -> Result<()> {
        let want = self.crcs[gfn as usize];
        let got = page_crc(page);
        if got != want {
            return Err(LazyError::Corrupt {
                gfn,
                path: self.label.clone(),
                what: format!("CRC-32 {got:#010x}, the snapshot recorded {want:#010x}"),
            });
        }
        Ok(())
    }
}

impl PageSource for VerifiedImage {
    fn pages(&self) -> u64 {
        self.inner.pages()
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.inner.read_page(gfn, buf)?;
        self.check(gfn, buf)
    }

    fn read_run(&self, gfn: Gfn, buf: &mut [u8]) -> Result<()> {
        self.inner.read_run(gfn, buf)?;
        for (i, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            self.check(gfn + i as u64, page)?;
        }
        Ok(())
    }

    /// A hole is zero only if zero was recorded: data written into a hole is caught on read.
    fn is_known_zero(&self, gfn: Gfn) -> bool {
        self.inner.is_known_zero(gfn) && self.crcs.get(gfn as usize) == Some(&zero_page_crc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::MemfdImage;

    fn image(fill: impl Fn(usize) -> u8) -> Arc<dyn PageSource> {
        let mut b = vec![0u8; 8 * PAGE_SIZE];
        for g in [1usize, 2, 5] {
            b[g * PAGE_SIZE..(g + 1) * PAGE_SIZE].fill(fill(g));
        }
        Arc::new(MemfdImage::from_bytes(&b).unwrap())
    }

    fn crcs_of(src: &dyn PageSource) -> Arc<[u32]> {
        let mut page = [0u8; PAGE_SIZE];
        (0..src.pages())
            .map(|g| {
                src.read_page(g, &mut page).unwrap();
                page_crc(&page)
            })
            .collect()
    }

    #[test]
    fn good_pages_pass_and_a_changed_page_is_refused() {
        let _g = crate::lazy::tests::fd_guard();
        let good = image(|g| g as u8 + 1);
        let crcs = crcs_of(good.as_ref());
        let v = VerifiedImage::new(good, crcs.clone(), "mem".into()).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for g in 0..8 {
            v.read_page(g, &mut page).unwrap();
        }
        let mut run = vec![0u8; 8 * PAGE_SIZE];
        v.read_run(0, &mut run).unwrap();
        assert!(v.is_known_zero(0) && !v.is_known_zero(1));
        // Page 2 holds other bytes than recorded; page 3 was a hole and now holds data.
        let bad = image(|g| if g == 2 { 0xEE } else { g as u8 + 1 });
        let mut crcs2 = crcs.to_vec();
        crcs2[5] = 1; // page 5's record is wrong
        let v = VerifiedImage::new(bad, crcs2.into(), "snap/memory.kmem".into()).unwrap();
        v.read_page(1, &mut page).unwrap();
        let e = v.read_page(2, &mut page).unwrap_err();
        assert!(
            matches!(&e, LazyError::Corrupt { gfn: 2, path, .. } if path == "snap/memory.kmem"),
            "{e}"
        );
        assert!(v.read_run(0, &mut run).is_err());
        assert!(v.read_page(5, &mut page).is_err());
        let short: Arc<[u32]> = vec![0u32; 3].into();
        assert!(VerifiedImage::new(image(|_| 1), short, "x".into()).is_err());
    }
}
