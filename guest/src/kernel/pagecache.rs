//! The page cache: per file a radix tree exactly as `abi::kinfo::RadixNode` describes (64
//! slots per node, leaves hold direct-map addresses of cached pages), filled on demand from
//! the block device. Cached pages stay until the VM dies (the cache never shrinks).

use kscope_guest::abi::kinfo::{
    file_kind, frame_use, RadixNode, RADIX_FANOUT, RADIX_NODE_SIZE, RADIX_SHIFT,
};
use kscope_guest::abi::layout::{virt_to_phys, PAGE_SIZE};

use crate::arch::KCell;
use crate::fs;
use crate::klib;
use crate::mm::{frame, slab::Slab, va};

static NODES: KCell<Slab> = KCell::new(Slab::new(RADIX_NODE_SIZE as u64));

/// A page could not be brought into the cache.
#[derive(Debug, Clone, Copy)]
pub enum PcError {
    /// The index lies beyond the end of the file.
    BeyondEof,
    /// Out of memory.
    NoMem,
    /// The disk read failed.
    Io,
}

fn node(v: u64) -> &'static mut RadixNode {
    // SAFETY: `v` is a radix node allocated from `NODES` (direct-mapped kernel memory) and
    // never freed while its file is cached.
    unsafe { &mut *(v as *mut RadixNode) }
}

fn covers(shift: u32, index: u64) -> bool {
    let bits = shift + RADIX_SHIFT;
    bits >= 64 || index >> bits == 0
}

/// The cached page of `file` at page `index` (physical address), if present.
pub fn lookup(file: usize, index: u64) -> Option<u64> {
    let root = fs::file(file).abi.radix_root;
    if root == 0 || !covers(node(root).shift, index) {
        return None;
    }
    let mut n = node(root);
    loop {
        let slot = n.slots[((index >> n.shift) & (RADIX_FANOUT as u64 - 1)) as usize];
        if slot == 0 {
            return None;
        }
        if n.shift == 0 {
            return Some(virt_to_phys(slot));
        }
        n = node(slot);
    }
}

fn new_node(shift: u32, parent: u64) -> Result<u64, PcError> {
    let v = NODES.get().alloc().ok_or(PcError::NoMem)?;
    let n = node(v);
    n.shift = shift;
    n.parent = parent;
    Ok(v)
}

fn insert(file: usize, index: u64, page_va: u64) -> Result<(), PcError> {
    let f = fs::file(file);
    if f.abi.radix_root == 0 {
        f.abi.radix_root = new_node(0, 0)?;
    }
    while !covers(node(f.abi.radix_root).shift, index) {
        let old = f.abi.radix_root;
        let up = new_node(node(old).shift + RADIX_SHIFT, 0)?;
        node(up).slots[0] = old;
        node(up).count = 1;
        node(old).parent = up;
        f.abi.radix_root = up;
    }
    let mut cur = f.abi.radix_root;
    while node(cur).shift > 0 {
        let n = node(cur);
        let i = ((index >> n.shift) & (RADIX_FANOUT as u64 - 1)) as usize;
        if n.slots[i] == 0 {
            let child = new_node(n.shift - RADIX_SHIFT, cur)?;
            n.slots[i] = child;
            n.count += 1;
        }
        cur = n.slots[i];
    }
    let leaf = node(cur);
    let i = (index & (RADIX_FANOUT as u64 - 1)) as usize;
    if leaf.slots[i] == 0 {
        leaf.count += 1;
        f.abi.nr_cached += 1;
    }
    leaf.slots[i] = page_va;
    Ok(())
}

/// The page of `file` at page `index`, read from disk on a miss (physical address). A miss
/// reads ahead: up to [`crate::blk::MAX_PAGES`] consecutive uncached pages in one request.
pub fn get(file: usize, index: u64) -> Result<u64, PcError> {
    if let Some(p) = lookup(file, index) {
        return Ok(p);
    }
    let f = fs::file(file);
    let size = f.abi.size;
    let npages = size.div_ceil(PAGE_SIZE);
    if index >= npages {
        return Err(PcError::BeyondEof);
    }
    let (use_, ino) = cache_use(file);
    let mut frames = [0u64; crate::blk::MAX_PAGES];
    let mut n = 0;
    while n < frames.len() && index + (n as u64) < npages {
        if n > 0 && lookup(file, index + n as u64).is_some() {
            break;
        }
        match frame::alloc(use_, ino) {
            Some(p) => frames[n] = p,
            None if n > 0 => break,
            None => return Err(PcError::NoMem),
        }
        n += 1;
    }
    let disk = fs::file(file).disk_offset + index * PAGE_SIZE;
    if crate::blk::read_pages(disk, &frames[..n], PAGE_SIZE as u32).is_err() {
        frames[..n].iter().for_each(|&p| frame::free(p));
        return Err(PcError::Io);
    }
    for (k, &phys) in frames[..n].iter().enumerate() {
        let off = (index + k as u64) * PAGE_SIZE;
        let valid = (size - off).min(PAGE_SIZE);
        if valid < PAGE_SIZE {
            // SAFETY: the tail of the frame we just filled.
            unsafe {
                klib::memset(
                    (va(phys) + valid) as *mut u8,
                    0,
                    (PAGE_SIZE - valid) as usize,
                )
            };
        }
        if let Err(e) = insert(file, index + k as u64, va(phys)) {
            frames[k..n].iter().for_each(|&p| frame::free(p));
            return Err(e);
        }
    }
    Ok(frames[0])
}

/// The ground-truth use of an unmapped page-cache page of `file`.
pub fn cache_use(file: usize) -> (u8, u32) {
    let f = fs::file(file);
    let u = if f.abi.kind == file_kind::EXEC {
        frame_use::PAGE_CACHE_EXEC
    } else {
        frame_use::PAGE_CACHE_DATA
    };
    (u, f.abi.ino)
}
