//! Page sources: where a clone's pages come from ([`MemfdImage`], [`DeferredImage`],
//! [`FileImage`], [`LayeredImage`]), and [`eager_fill`], the one routine that copies a whole
//! source into guest RAM.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::Serialize;

use super::{io_at, Bitmap, LazyError, Result};
use crate::hostmem::{memfd_create, Gfn, Mapping, PAGE_SIZE};

/// A read-only image of guest memory, page by page. Implementations must be safe to read from
/// several threads at once (fault handler and background fetcher).
pub trait PageSource: Send + Sync {
    /// Number of pages in the image.
    fn pages(&self) -> u64;

    /// Copies page `gfn` into `buf`.
    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()>;

    /// Copies pages `[gfn, gfn + buf.len() / 4096)` into `buf` (a whole number of pages).
    /// The default reads page by page; sources with a cheaper bulk read override it.
    fn read_run(&self, gfn: Gfn, buf: &mut [u8]) -> Result<()> {
        for (i, chunk) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let page: &mut [u8; PAGE_SIZE] = chunk
                .try_into()
                .map_err(|_| LazyError::Size("partial page".into()))?;
            self.read_page(gfn + i as u64, page)?;
        }
        Ok(())
    }

    /// True if the page is known to be all zeros without reading it (sparse sources know
    /// their holes). `false` means "unknown or not zero".
    fn is_known_zero(&self, gfn: Gfn) -> bool {
        let _ = gfn;
        false
    }
}

fn check(gfn: Gfn, pages: u64, what: &'static str) -> Result<()> {
    if gfn >= pages {
        return Err(LazyError::OutOfRange { gfn, pages, what });
    }
    Ok(())
}

/// Data pages of a file by `SEEK_DATA`/`SEEK_HOLE` (every page if the file system cannot say).
fn data_pages(fd: BorrowedFd<'_>, pages: u64) -> Bitmap {
    let len = (pages * PAGE_SIZE as u64) as libc::off_t;
    let mut map = Bitmap::new(pages);
    let mut pos: libc::off_t = 0;
    while pos < len {
        // SAFETY: lseek on a valid descriptor; it only moves the file offset, which no
        // reader of this module uses (reads are positional).
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Bitmap::full(pages); // cannot tell: treat everything as data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole.min(len) };
        let first = data as u64 / PAGE_SIZE as u64;
        let last = (end as u64).div_ceil(PAGE_SIZE as u64);
        map.set_range(first, last);
        pos = end;
    }
    map
}

/// A frozen memfd (for example the parent's RAM at the clone point), read through its own
/// read-only mapping. Holes (pages never written) are known zero and are never touched, so
/// reading the image does not grow its footprint.
///
/// "Frozen" is the caller's promise: nothing may write the memfd while clones read it.
#[derive(Debug)]
pub struct MemfdImage {
    map: Mapping,
    fd: OwnedFd,
    data: Bitmap,
}

impl MemfdImage {
    /// Wraps a memfd (or any shmem/tmpfs file) of `pages` pages.
    pub fn new(fd: OwnedFd, pages: u64) -> Result<Self> {
        let map = Mapping::new(Some(fd.as_fd()), (pages as usize) * PAGE_SIZE, false, true)
            .map_err(io_at("mmap of an image memfd"))?;
        let data = data_pages(fd.as_fd(), pages);
        Ok(Self { map, fd, data })
    }

    /// Builds an image from bytes (padded with zeros to whole pages); all-zero pages stay
    /// holes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let pages = bytes.len().div_ceil(PAGE_SIZE) as u64;
        let fd = memfd_create(c"kscope-image", pages * PAGE_SIZE as u64)
            .map_err(io_at("memfd_create"))?;
        let file = File::from(fd.try_clone().map_err(|e| LazyError::Io {
            op: "dup".into(),
            source: e,
        })?);
        for (i, chunk) in bytes.chunks(PAGE_SIZE).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                file.write_all_at(chunk, (i * PAGE_SIZE) as u64)
                    .map_err(|e| LazyError::Io {
                        op: "write image memfd".into(),
                        source: e,
                    })?;
            }
        }
        Self::new(fd, pages)
    }

    /// The memfd.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Pages that hold data (not holes).
    pub fn data_pages(&self) -> &Bitmap {
        &self.data
    }
}

impl PageSource for MemfdImage {
    fn pages(&self) -> u64 {
        self.data.len()
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        check(gfn, self.pages(), "memfd image")?;
        if !self.data.get(gfn) {
            buf.fill(0);
            return Ok(());
        }
        self.map
            .read(gfn as usize * PAGE_SIZE, buf)
            .map_err(io_at("read image memfd"))
    }

    fn is_known_zero(&self, gfn: Gfn) -> bool {
        gfn < self.pages() && !self.data.get(gfn)
    }
}

/// A snapshot memory file read with `pread`: page `n` at offset `n * 4096`, holes read as
/// zero (found with `SEEK_DATA`/`SEEK_HOLE`), a file shorter than the image reads as zero past
/// its end.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    data: Bitmap,
}

impl FileImage {
    /// Opens a memory file. With `pages: None`, its length (rounded up to pages) is the
    /// image size; with `Some(n)` the file must not be longer than `n` pages.
    pub fn open(path: &Path, pages: Option<u64>) -> Result<Self> {
        let file = File::open(path).map_err(|e| LazyError::Io {
            op: format!("open {}", path.display()),
            source: e,
        })?;
        let len = file
            .metadata()
            .map_err(|e| LazyError::Io {
                op: format!("stat {}", path.display()),
                source: e,
            })?
            .len();
        let file_pages = len.div_ceil(PAGE_SIZE as u64);
        let pages = match pages {
            None => file_pages,
            Some(n) if file_pages <= n => n,
            Some(n) => {
                return Err(LazyError::Size(format!(
                    "memory file {} has {file_pages} pages, more than the expected {n}",
                    path.display()
                )))
            }
        };
        let mut data = data_pages(file.as_fd(), file_pages);
        if data.len() != pages {
            let mut d = Bitmap::new(pages);
            data.iter_set().for_each(|g| d.set(g));
            data = d;
        }
        Ok(Self { file, data })
    }

    /// Pages that hold data (not holes).
    pub fn data_pages(&self) -> &Bitmap {
        &self.data
    }
}

impl PageSource for FileImage {
    fn pages(&self) -> u64 {
        self.data.len()
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        check(gfn, self.pages(), "memory file")?;
        if !self.data.get(gfn) {
            buf.fill(0);
            return Ok(());
        }
        let mut done = 0;
        while done < PAGE_SIZE {
            let n = self
                .file
                .read_at(&mut buf[done..], gfn * PAGE_SIZE as u64 + done as u64)
                .map_err(|e| LazyError::Io {
                    op: format!("pread page {gfn} of memory file"),
                    source: e,
                })?;
            if n == 0 {
                buf[done..].fill(0); // past the end of a short file
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn read_run(&self, gfn: Gfn, buf: &mut [u8]) -> Result<()> {
        let n = (buf.len() / PAGE_SIZE) as u64;
        if n == 0 {
            return Ok(());
        }
        check(gfn + n - 1, self.pages(), "memory file")?;
        // Holes and the part past the end of the file read as zeros.
        let mut done = 0;
        while done < buf.len() {
            let got = self
                .file
                .read_at(&mut buf[done..], gfn * PAGE_SIZE as u64 + done as u64)
                .map_err(|e| LazyError::Io {
                    op: format!("pread pages {gfn}+{n} of memory file"),
                    source: e,
                })?;
            if got == 0 {
                buf[done..].fill(0);
                break;
            }
            done += got;
        }
        Ok(())
    }

    fn is_known_zero(&self, gfn: Gfn) -> bool {
        gfn < self.pages() && !self.data.get(gfn)
    }
}

/// One layer of a [`LayeredImage`] and the pages it holds (`None`: every page, the base).
type Layer = (Arc<dyn PageSource>, Option<Arc<Bitmap>>);

/// Layers of images: the newest layer that has a page provides it, older layers fill in the
/// rest. Typical use: a generation image = the base memfd (bottom, complete) plus layers of
/// the pages dirtied since (each a layer whose presence bitmap marks those pages).
#[derive(Clone)]
pub struct LayeredImage {
    /// Newest first; `None` presence means the layer has every page it holds (the base).
    /// Cloning an image shares its layers (a parent's next generation stacks one more).
    layers: Vec<Layer>,
    pages: u64,
}

impl std::fmt::Debug for LayeredImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredImage")
            .field("layers", &self.layers.len())
            .field("pages", &self.pages)
            .finish()
    }
}

impl LayeredImage {
    /// An image made of one complete base layer.
    pub fn new(base: Arc<dyn PageSource>) -> Self {
        let pages = base.pages();
        Self {
            layers: vec![(base, None)],
            pages,
        }
    }

    /// An image of `pages` pages over a base that may be shorter (pages past its end read as
    /// zeros), e.g. a clone region larger than its parent's image.
    pub fn with_pages(base: Arc<dyn PageSource>, pages: u64) -> Result<Self> {
        if pages < base.pages() {
            return Err(LazyError::Size(format!(
                "image of {pages} pages over a {}-page base",
                base.pages()
            )));
        }
        Ok(Self {
            layers: vec![(base, None)],
            pages,
        })
    }

    /// Adds a newer layer holding the pages set in `present`, which must be as long as the
    /// image; the layer must be able to read every page `present` marks.
    pub fn push(
        &mut self,
        layer: Arc<dyn PageSource>,
        present: impl Into<Arc<Bitmap>>,
    ) -> Result<()> {
        let present = present.into();
        if present.len() != self.pages {
            return Err(LazyError::Size(format!(
                "layer presence bitmap has {} pages, the image {}",
                present.len(),
                self.pages
            )));
        }
        if layer.pages() >= self.pages {
            // Every page the bitmap can mark is inside the layer.
        } else if let Some(g) = present.iter_set().find(|&g| g >= layer.pages()) {
            return Err(LazyError::OutOfRange {
                gfn: g,
                pages: layer.pages(),
                what: "layer",
            });
        }
        self.layers.insert(0, (layer, Some(present)));
        Ok(())
    }

    /// Number of layers (base included).
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    fn layer_of(&self, gfn: Gfn) -> Option<&Arc<dyn PageSource>> {
        self.layers
            .iter()
            .find(|(l, present)| present.as_ref().map_or(gfn < l.pages(), |p| p.get(gfn)))
            .map(|(l, _)| l)
    }
}

impl PageSource for LayeredImage {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        check(gfn, self.pages, "layered image")?;
        match self.layer_of(gfn) {
            Some(l) => l.read_page(gfn, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn is_known_zero(&self, gfn: Gfn) -> bool {
        gfn < self.pages && self.layer_of(gfn).is_none_or(|l| l.is_known_zero(gfn))
    }
}

/// A [`MemfdImage`] whose hole scan (`SEEK_DATA` over the whole memfd, proportional to its
/// size) runs on a helper thread, so that children can be created and started while it runs.
/// Until it is done, pages are read with `pread` (holes read as zeros without being
/// allocated). The scanned image is published once through a `OnceLock`: readers never lock.
pub struct DeferredImage {
    pages: u64,
    file: File,
    ready: OnceLock<Option<Arc<MemfdImage>>>,
}

impl std::fmt::Debug for DeferredImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredImage")
            .field("pages", &self.pages)
            .field("scanned", &self.ready.get().is_some())
            .finish()
    }
}

impl DeferredImage {
    /// The image of a frozen memfd of `pages` pages, read with `pread` until
    /// [`start_scan`](Self::start_scan) is called and its scan is done.
    pub fn new(fd: OwnedFd, pages: u64) -> Arc<DeferredImage> {
        Arc::new(DeferredImage {
            pages,
            file: File::from(fd),
            ready: OnceLock::new(),
        })
    }

    /// Scans the memfd for its holes on a thread (once); until then and meanwhile, pages are
    /// read with `pread`.
    pub fn start_scan(self: &Arc<Self>) {
        if self.ready.get().is_some() {
            return;
        }
        let fd = match self.file.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(
                    "cannot dup the frozen memfd for its scan ({e}); reading with pread"
                );
                let _ = self.ready.set(None);
                return;
            }
        };
        let (target, pages) = (self.clone(), self.pages);
        let scan = move || {
            let image = match MemfdImage::new(fd, pages) {
                Ok(i) => Some(Arc::new(i)),
                Err(e) => {
                    tracing::warn!("image scan failed ({e}); reading the memfd with pread");
                    None
                }
            };
            let _ = target.ready.set(image);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("kscope-imgscan".into())
            .spawn(scan)
        {
            tracing::warn!("cannot start the image scan thread ({e}); reading with pread");
            let _ = self.ready.set(None);
        }
    }

    /// The scanned image if the scan is done.
    fn done(&self) -> Option<&Arc<MemfdImage>> {
        self.ready.get().and_then(Option::as_ref)
    }

    fn pread(&self, gfn: Gfn, buf: &mut [u8]) -> Result<()> {
        if gfn + (buf.len() / PAGE_SIZE) as u64 > self.pages {
            return Err(LazyError::OutOfRange {
                gfn,
                pages: self.pages,
                what: "frozen memfd",
            });
        }
        self.file
            .read_exact_at(buf, gfn * PAGE_SIZE as u64)
            .map_err(io_at(format!("pread page {gfn} of the frozen memfd")))
    }
}

impl PageSource for DeferredImage {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, gfn: Gfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        match self.done() {
            Some(i) => i.read_page(gfn, buf),
            None => self.pread(gfn, buf),
        }
    }

    fn read_run(&self, gfn: Gfn, buf: &mut [u8]) -> Result<()> {
        match self.done() {
            Some(i) => i.read_run(gfn, buf),
            None => self.pread(gfn, buf),
        }
    }

    fn is_known_zero(&self, gfn: Gfn) -> bool {
        self.done().is_some_and(|i| i.is_known_zero(gfn))
    }
}

/// Result of an [`eager_fill`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EagerReport {
    /// Pages copied.
    pub copied: u64,
    /// Pages skipped as zero (known holes or all-zero content).
    pub zero: u64,
    /// Wall time (ns).
    pub elapsed_ns: u64,
}

/// Eager propagation: copies every non-zero page of `source` into fresh, zeroed memory
/// through `write(byte offset, page)` before the clone resumes. Known-zero and all-zero pages
/// are skipped, so they stay unallocated.
pub fn eager_fill<E>(
    source: &dyn PageSource,
    mut write: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
) -> std::result::Result<EagerReport, E>
where
    E: From<LazyError>,
{
    let t0 = Instant::now();
    let mut rep = EagerReport::default();
    let mut buf = [0u8; PAGE_SIZE];
    for g in 0..source.pages() {
        if source.is_known_zero(g) {
            rep.zero += 1;
            continue;
        }
        source.read_page(g, &mut buf)?;
        if buf.iter().all(|&b| b == 0) {
            rep.zero += 1;
            continue;
        }
        write(g * PAGE_SIZE as u64, &buf)?;
        rep.copied += 1;
    }
    rep.elapsed_ns = t0.elapsed().as_nanos() as u64;
    Ok(rep)
}
