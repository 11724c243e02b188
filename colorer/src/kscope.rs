//! The profile of kscope's own guest kernel: reads the [`KInfo`] descriptor at
//! [`KINFO_GPA`] and the process table, file table, page-cache radix trees and frame bitmap it
//! points to.
//!
//! Kernel virtual addresses are translated with the direct map (`direct_map_base`) when they
//! fall in it and through the kernel's own page tables (`kernel_pml4`) otherwise; every
//! pointer, count and stride is validated. The ground-truth table that [`KInfo`] also points to
//! is deliberately not copied into [`Descriptor`]: only [`crate::accuracy`] reads it.

use crate::mem::{frame_count, FrameSet, Gfn, PhysMem};
use crate::pagewalk::{translate, KERNEL_HALF};
use crate::profile::{
    FileInfo, FileKind, GuestProfile, ImageRange, ProcessRoot, ProfileAnomalies, ProfileError,
    Section,
};
use crate::radix;
use kscope_guest::abi::from_bytes;
use kscope_guest::abi::kinfo::{
    file_kind, proc_state, FileAbi, KInfo, ProcAbi, RadixNode, KINFO_MAGIC, KINFO_VERSION,
    RADIX_NODE_SIZE,
};
use kscope_guest::abi::layout::{KINFO_GPA, LOW_RESERVED_END, PAGE_SIZE};
use std::cell::Cell;
use std::ops::Range;

/// Largest process table accepted.
const MAX_PROCS: u32 = 1 << 16;
/// Largest file table accepted.
const MAX_FILES: u32 = 1 << 20;
/// Largest table entry stride accepted.
const MAX_STRIDE: u32 = 1 << 16;

/// The validated fields of [`KInfo`] the colorer uses (everything but the ground truth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Layout version.
    pub version: u32,
    /// Virtual base of the direct map.
    pub direct_map_base: u64,
    /// Virtual base of the kernel image mapping.
    pub kernel_virt_base: u64,
    /// Guest-physical address of the kernel PML4.
    pub kernel_pml4: u64,
    /// Template of the user-mode PML4s (native mode's page-table isolation), 0 if none.
    pub user_pml4_template: u64,
    /// Bytes of guest RAM the kernel manages.
    pub mem_bytes: u64,
    /// Kernel text (virtual).
    pub text: (u64, u64),
    /// Kernel rodata (virtual).
    pub rodata: (u64, u64),
    /// Kernel data + bss (virtual).
    pub data: (u64, u64),
    /// Frame bitmap (virtual) and the number of frames it covers.
    pub frame_bitmap: (u64, u64),
    /// Free frames the kernel counts.
    pub free_frames: u64,
    /// Process table (virtual), capacity, stride.
    pub proc_table: (u64, u32, u32),
    /// File table (virtual), capacity, stride.
    pub file_table: (u64, u32, u32),
}

/// [`GuestProfile`] of the kscope guest kernel.
pub struct KscopeProfile<'m, M: PhysMem + ?Sized> {
    mem: &'m M,
    desc: Descriptor,
    anomalies: Cell<ProfileAnomalies>,
}

fn invalid(field: &'static str, value: u64, why: &'static str) -> ProfileError {
    ProfileError::Invalid { field, value, why }
}

fn check_table(
    field: &'static str,
    va: u64,
    max: u32,
    stride: u32,
    min_stride: usize,
    cap: u32,
) -> Result<(u64, u32, u32), ProfileError> {
    if max > cap {
        return Err(invalid(field, u64::from(max), "capacity too large"));
    }
    if max > 0 && ((stride as usize) < min_stride || stride > MAX_STRIDE) {
        return Err(invalid(
            field,
            u64::from(stride),
            "stride smaller than the ABI entry or too large",
        ));
    }
    if max > 0 && va < KERNEL_HALF {
        return Err(invalid(field, va, "not a kernel virtual address"));
    }
    Ok((va, max, stride))
}

impl<'m, M: PhysMem + ?Sized> KscopeProfile<'m, M> {
    /// Read and validate the descriptor of the guest in `mem`.
    pub fn open(mem: &'m M) -> Result<Self, ProfileError> {
        let mut buf = vec![0u8; core::mem::size_of::<KInfo>()];
        mem.read(KINFO_GPA, &mut buf)?;
        let k: KInfo = from_bytes(&buf).ok_or(invalid("size", 0, "short read"))?;
        if k.magic != KINFO_MAGIC {
            return Err(ProfileError::NotFound {
                what: "KInfo descriptor at GPA 0x9000",
                hint: "color a kscope guest after it reported READY (the kernel writes the \
                       descriptor during boot), or use RootsOnlyProfile for other guests",
            });
        }
        if k.version != KINFO_VERSION {
            return Err(ProfileError::Version {
                found: k.version,
                expected: KINFO_VERSION,
            });
        }
        if (k.size as usize) < core::mem::size_of::<KInfo>() {
            return Err(invalid(
                "size",
                u64::from(k.size),
                "smaller than this ABI's KInfo",
            ));
        }
        let frames = frame_count(mem);
        if !k.kernel_pml4.is_multiple_of(PAGE_SIZE) || k.kernel_pml4 / PAGE_SIZE >= frames {
            return Err(invalid(
                "kernel_pml4",
                k.kernel_pml4,
                "not a frame of guest RAM",
            ));
        }
        if k.mem_bytes == 0 || k.mem_bytes > mem.size() {
            return Err(invalid(
                "mem_bytes",
                k.mem_bytes,
                "zero or larger than the memory given",
            ));
        }
        if k.direct_map_base < KERNEL_HALF || !k.direct_map_base.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(
                "direct_map_base",
                k.direct_map_base,
                "not a page-aligned kernel address",
            ));
        }
        if k.direct_map_base.checked_add(k.mem_bytes).is_none() {
            return Err(invalid(
                "direct_map_base",
                k.direct_map_base,
                "direct map wraps",
            ));
        }
        for (f, s, e) in [
            ("text", k.text_start, k.text_end),
            ("rodata", k.rodata_start, k.rodata_end),
            ("data", k.data_start, k.data_end),
        ] {
            if s > e || (s != 0 && s < KERNEL_HALF) || e - s > k.mem_bytes {
                return Err(invalid(
                    f,
                    s,
                    "section range reversed, outside the kernel half or too large",
                ));
            }
        }
        if k.frame_count > frames {
            return Err(invalid(
                "frame_count",
                k.frame_count,
                "more frames than guest RAM",
            ));
        }
        let desc = Descriptor {
            version: k.version,
            direct_map_base: k.direct_map_base,
            kernel_virt_base: k.kernel_virt_base,
            kernel_pml4: k.kernel_pml4,
            user_pml4_template: k.user_pml4_template,
            mem_bytes: k.mem_bytes,
            text: (k.text_start, k.text_end),
            rodata: (k.rodata_start, k.rodata_end),
            data: (k.data_start, k.data_end),
            frame_bitmap: (k.frame_bitmap, k.frame_count),
            free_frames: k.free_frames,
            proc_table: check_table(
                "proc_stride",
                k.proc_table,
                k.proc_max,
                k.proc_stride,
                core::mem::size_of::<ProcAbi>(),
                MAX_PROCS,
            )?,
            file_table: check_table(
                "file_stride",
                k.file_table,
                k.file_max,
                k.file_stride,
                core::mem::size_of::<FileAbi>(),
                MAX_FILES,
            )?,
        };
        Ok(KscopeProfile {
            mem,
            desc,
            anomalies: Cell::new(ProfileAnomalies::default()),
        })
    }

    /// The validated descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// Guest-physical address of kernel virtual address `va`, if it maps to guest RAM.
    pub fn virt_to_phys(&self, va: u64) -> Option<u64> {
        let d = &self.desc;
        let pa = if va >= d.direct_map_base && va - d.direct_map_base < d.mem_bytes {
            va - d.direct_map_base
        } else {
            translate(self.mem, d.kernel_pml4, va).ok()??.0
        };
        (pa < self.mem.size()).then_some(pa)
    }

    /// Read `buf.len()` bytes at kernel virtual address `va` (page by page).
    pub fn read_virt(
        &self,
        va: u64,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), ProfileError> {
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va.wrapping_add(done as u64);
            let in_page = (PAGE_SIZE - cur % PAGE_SIZE) as usize;
            let n = in_page.min(buf.len() - done);
            let pa = self
                .virt_to_phys(cur)
                .ok_or(ProfileError::Unmapped { va: cur, what })?;
            self.mem.read(pa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_struct<T: Copy>(&self, va: u64, what: &'static str) -> Result<T, ProfileError> {
        let mut buf = vec![0u8; core::mem::size_of::<T>()];
        self.read_virt(va, &mut buf, what)?;
        from_bytes(&buf).ok_or(invalid(what, va, "short read"))
    }

    fn bump(&self, f: impl FnOnce(&mut ProfileAnomalies)) {
        let mut a = self.anomalies.get();
        f(&mut a);
        self.anomalies.set(a);
    }

    fn section_frames(
        &self,
        section: Section,
        (start, end): (u64, u64),
        out: &mut Vec<ImageRange>,
    ) {
        if start == 0 || end <= start {
            return;
        }
        let mut va = start & !(PAGE_SIZE - 1);
        while va < end {
            if let Some(pa) = self.virt_to_phys(va) {
                let gfn = pa / PAGE_SIZE;
                match out.last_mut() {
                    Some(r) if r.section == section && r.gfns.end == gfn => r.gfns.end += 1,
                    _ => out.push(ImageRange {
                        section,
                        gfns: gfn..gfn + 1,
                    }),
                }
            }
            va += PAGE_SIZE;
        }
    }
}

fn c_name(bytes: &[u8]) -> String {
    let n = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..n]).into_owned()
}

impl<M: PhysMem + ?Sized> GuestProfile for KscopeProfile<'_, M> {
    fn name(&self) -> &str {
        "kscope"
    }

    /// The kernel's PML4 and, with page-table isolation, the user-mode template and every
    /// process's user-mode PML4 (the frame after its CR3): page tables no process CR3 reaches.
    fn kernel_roots(&self) -> Result<Vec<u64>, ProfileError> {
        let mut roots = vec![self.desc.kernel_pml4];
        let tpl = self.desc.user_pml4_template;
        if tpl != 0 && tpl.is_multiple_of(PAGE_SIZE) && tpl / PAGE_SIZE < frame_count(self.mem) {
            roots.push(tpl);
            roots.extend(self.processes()?.iter().map(|p| p.cr3 + PAGE_SIZE));
        }
        Ok(roots)
    }

    fn processes(&self) -> Result<Vec<ProcessRoot>, ProfileError> {
        let (table, max, stride) = self.desc.proc_table;
        let frames = frame_count(self.mem);
        let mut out = Vec::new();
        for i in 0..u64::from(max) {
            let p: ProcAbi = self.read_struct(table + i * u64::from(stride), "process table")?;
            match p.state {
                proc_state::FREE => continue,
                // A zombie's address space may already be torn down: its root may be free.
                proc_state::ZOMBIE => continue,
                proc_state::RUNNABLE | proc_state::BLOCKED
                    if p.pid > 0
                        && p.cr3.is_multiple_of(PAGE_SIZE)
                        && p.cr3 / PAGE_SIZE < frames =>
                {
                    out.push(ProcessRoot {
                        pid: p.pid,
                        cr3: p.cr3,
                        name: c_name(&p.name),
                    });
                }
                _ => self.bump(|a| a.bad_processes += 1),
            }
        }
        Ok(out)
    }

    fn kernel_image(&self) -> Result<Vec<ImageRange>, ProfileError> {
        let mut out = Vec::new();
        self.section_frames(Section::Text, self.desc.text, &mut out);
        self.section_frames(Section::Rodata, self.desc.rodata, &mut out);
        self.section_frames(Section::Data, self.desc.data, &mut out);
        Ok(out)
    }

    fn ignored_ranges(&self) -> Result<Vec<Range<u64>>, ProfileError> {
        let d = &self.desc;
        // The direct map, rounded up to 1 GiB (it may be mapped with 1 GiB pages).
        let dm_len = d.mem_bytes.div_ceil(1 << 30) << 30;
        let mut out = Vec::with_capacity(3);
        out.push(d.direct_map_base..d.direct_map_base.saturating_add(dm_len));
        // The kernel image window outside the image and the boot area (a kernel may map a
        // whole 2 MiB or 1 GiB region there, which would otherwise make every frame look like
        // kernel code).
        let img_start = [d.text.0, d.rodata.0, d.data.0]
            .into_iter()
            .filter(|&s| s != 0)
            .min();
        let img_end = [d.text.1, d.rodata.1, d.data.1]
            .into_iter()
            .max()
            .unwrap_or(0);
        if let Some(s) = img_start {
            let s = s & !(PAGE_SIZE - 1);
            let e = img_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            // Below the image, the window maps the reserved boot structures (GDT, IDT, TSS,
            // KInfo: kernel data); ignore only what lies between them and the image.
            let low_end = d.kernel_virt_base.saturating_add(LOW_RESERVED_END);
            if d.kernel_virt_base >= KERNEL_HALF && low_end < s {
                out.push(low_end..s);
            }
            out.push(e..u64::MAX);
        }
        Ok(out)
    }

    fn files(&self) -> Result<Vec<FileInfo>, ProfileError> {
        let (table, max, stride) = self.desc.file_table;
        let mut out = Vec::new();
        for i in 0..u64::from(max) {
            let f: FileAbi = self.read_struct(table + i * u64::from(stride), "file table")?;
            let kind = match f.kind {
                file_kind::NONE => continue,
                file_kind::EXEC => FileKind::Exec,
                file_kind::DATA => FileKind::Data,
                _ => {
                    self.bump(|a| a.bad_files += 1);
                    continue;
                }
            };
            out.push(FileInfo {
                ino: f.ino,
                kind,
                size: f.size,
                name: c_name(&f.name),
                cache_root: f.radix_root,
                nr_cached: f.nr_cached,
            });
        }
        Ok(out)
    }

    fn file_pages(&self, file: &FileInfo) -> Result<Vec<(u64, Gfn)>, ProfileError> {
        let mut an = self.anomalies.get();
        let frames = frame_count(self.mem);
        let mem_bytes = self.desc.mem_bytes;
        let out = radix::read_tree(
            file.cache_root,
            &mut |va| {
                let pa = self.virt_to_phys(va)?;
                let mut buf = [0u8; RADIX_NODE_SIZE];
                self.read_virt(va, &mut buf, "radix node").ok()?;
                Some((pa, from_bytes::<RadixNode>(&buf)?))
            },
            &mut |va| {
                if !va.is_multiple_of(PAGE_SIZE) {
                    return None;
                }
                let pa = self.virt_to_phys(va)?;
                (pa < mem_bytes).then_some(pa / PAGE_SIZE)
            },
            (frames as usize).saturating_mul(8).max(64),
            &mut an,
        );
        self.anomalies.set(an);
        Ok(out)
    }

    fn frames_in_use(&self) -> Result<Option<FrameSet>, ProfileError> {
        let (va, count) = self.desc.frame_bitmap;
        if va == 0 || count == 0 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; count.div_ceil(8) as usize];
        self.read_virt(va, &mut bytes, "frame bitmap")?;
        // Frames beyond the bitmap are not the allocator's: treat them as in use (unknown
        // role) rather than free, so they are never zero-filled.
        let mut set = FrameSet::from_le_bitmap(&bytes, frame_count(self.mem));
        for gfn in count..frame_count(self.mem) {
            set.insert(gfn);
        }
        Ok(Some(set))
    }

    fn anomalies(&self) -> ProfileAnomalies {
        self.anomalies.get()
    }
}
