//! The kernel's BTF (BPF Type Format, `CONFIG_DEBUG_INFO_BTF`): struct layouts and enum
//! values of the running kernel, for what VMCOREINFO does not say (e.g. `address_space.host`,
//! `inode.i_mode`, `page.index`, `PG_reserved`).
//!
//! The kernel keeps its BTF in its read-only data (the `.BTF` section that
//! `/sys/kernel/btf/vmlinux` serves), so it is found in the memory image itself: a 4-byte
//! aligned header with magic `0xeB9F`, version 1, whose type and string sections fit, and
//! whose first string is empty (as the format requires). Only the few queries the Linux
//! profile needs are implemented; every type is bounds-checked.

/// Errors of BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// No BTF in the kernel image.
    #[error("no BTF found in the kernel image ({0}): the Linux profile needs a kernel built with CONFIG_DEBUG_INFO_BTF for the fields VMCOREINFO lacks")]
    NotFound(String),
    /// Malformed BTF.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A type or member is absent.
    #[error("BTF has no {0}: this kernel's layout differs from what the Linux profile reads; it does not guess")]
    Absent(String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Ty {
    name: u32,
    info: u32,
    size_or_type: u32,
    /// Offset of the kind-specific data in the type section.
    extra: usize,
}

impl Ty {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

/// Parsed BTF.
pub struct Btf {
    types: Vec<u8>,
    strings: Vec<u8>,
    /// Index = type id (id 0 is void).
    index: Vec<Ty>,
}

fn rd32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// If a valid BTF header starts at `b[0]`, the total BTF length.
pub fn header_len(b: &[u8]) -> Option<usize> {
    if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC || b[2] != 1 {
        return None;
    }
    let hdr = rd32(b, 4)? as usize;
    let (toff, tlen, soff, slen) = (
        rd32(b, 8)? as usize,
        rd32(b, 12)? as usize,
        rd32(b, 16)? as usize,
        rd32(b, 20)? as usize,
    );
    if hdr < 24 || toff != 0 || tlen == 0 || slen == 0 || soff < toff + tlen {
        return None;
    }
    let total = hdr.checked_add(soff)?.checked_add(slen)?;
    // The string section starts with the empty string.
    if b.get(hdr + soff) != Some(&0) && b.len() > hdr + soff {
        return None;
    }
    Some(total)
}

impl Btf {
    /// Parse BTF bytes (header, types, strings).
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        let total = header_len(b).ok_or(BtfError::Malformed("bad header"))?;
        if b.len() < total {
            return Err(BtfError::Malformed("sections extend past the data"));
        }
        let hdr = rd32(b, 4).unwrap_or(24) as usize;
        let tlen = rd32(b, 12).unwrap_or(0) as usize;
        let soff = rd32(b, 16).unwrap_or(0) as usize;
        let slen = rd32(b, 20).unwrap_or(0) as usize;
        let types = b[hdr..hdr + tlen].to_vec();
        let strings = b[hdr + soff..hdr + soff + slen].to_vec();
        let mut index = vec![Ty {
            name: 0,
            info: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut at = 0usize;
        while at + 12 <= types.len() {
            let t = Ty {
                name: rd32(&types, at).unwrap_or(0),
                info: rd32(&types, at + 4).unwrap_or(0),
                size_or_type: rd32(&types, at + 8).unwrap_or(0),
                extra: at + 12,
            };
            let extra = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen(),
                KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen(),
                0 | 20.. => return Err(BtfError::Malformed("unknown type kind")),
                _ => 0,
            };
            index.push(t);
            at = t.extra + extra;
        }
        if at != types.len() {
            return Err(BtfError::Malformed("type section does not end on a type"));
        }
        Ok(Btf {
            types,
            strings,
            index,
        })
    }

    /// Number of types.
    pub fn len(&self) -> usize {
        self.index.len() - 1
    }

    /// True if there are no types.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn find(&self, kind: u32, name: &str) -> Option<&Ty> {
        self.index
            .iter()
            .skip(1)
            .find(|t| t.kind() == kind && self.name(t.name) == name)
    }

    /// Strip typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Ty> {
        for _ in 0..32 {
            let t = self.index.get(id as usize)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of member `name` in the struct/union `t`, searching anonymous members.
    fn member_bits(&self, t: &Ty, name: &str, depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        for i in 0..t.vlen() {
            let m = t.extra + 12 * i;
            let mname = rd32(&self.types, m)?;
            let mtype = rd32(&self.types, m + 4)?;
            let moff = rd32(&self.types, m + 8)?;
            let bits = u64::from(if t.kind_flag() {
                moff & 0xff_ffff
            } else {
                moff
            });
            if mname != 0 {
                if self.name(mname) == name {
                    return Some(bits);
                }
            } else if let Some(inner) = self.resolve(mtype) {
                if matches!(inner.kind(), KIND_STRUCT | KIND_UNION) {
                    if let Some(b) = self.member_bits(inner, name, depth + 1) {
                        return Some(bits + b);
                    }
                }
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name` (anonymous unions/structs are searched).
    pub fn offset(&self, name: &str, member: &str) -> Result<u64, BtfError> {
        let t = self
            .find(KIND_STRUCT, name)
            .ok_or_else(|| BtfError::Absent(format!("struct {name}")))?;
        let bits = self
            .member_bits(t, member, 0)
            .ok_or_else(|| BtfError::Absent(format!("member {name}.{member}")))?;
        if bits % 8 != 0 {
            return Err(BtfError::Absent(format!(
                "byte-aligned member {name}.{member}"
            )));
        }
        Ok(bits / 8)
    }

    /// Size of `struct name`.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        self.find(KIND_STRUCT, name)
            .map(|t| u64::from(t.size_or_type))
            .ok_or_else(|| BtfError::Absent(format!("struct {name}")))
    }

    /// Value of the enumerator `name` (in any enum).
    pub fn enumerator(&self, name: &str) -> Result<i64, BtfError> {
        for t in self.index.iter().skip(1) {
            let (step, wide) = match t.kind() {
                KIND_ENUM => (8, false),
                KIND_ENUM64 => (12, true),
                _ => continue,
            };
            for i in 0..t.vlen() {
                let e = t.extra + step * i;
                if self.name(rd32(&self.types, e).unwrap_or(0)) == name {
                    let lo = rd32(&self.types, e + 4).unwrap_or(0);
                    return Ok(if wide {
                        let hi = rd32(&self.types, e + 8).unwrap_or(0);
                        ((u64::from(hi) << 32) | u64::from(lo)) as i64
                    } else {
                        i64::from(lo as i32)
                    });
                }
            }
        }
        Err(BtfError::Absent(format!("enumerator {name}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build BTF bytes from (kind, name, info-vlen, size, extra words) entries.
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        pub(crate) fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn w(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) {
            let n = self.s(name);
            self.w(n);
            self.w(KIND_INT << 24);
            self.w(size);
            self.w(size * 8);
        }
        /// members: (name, type id, bit offset)
        pub(crate) fn strukt(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) {
            let n = self.s(name);
            self.w(n);
            self.w((kind << 24) | members.len() as u32);
            self.w(size);
            for &(m, t, off) in members {
                let mn = self.s(m);
                self.w(mn);
                self.w(t);
                self.w(off);
            }
        }
        pub(crate) fn enm(&mut self, name: &str, values: &[(&str, i32)]) {
            let n = self.s(name);
            self.w(n);
            self.w((KIND_ENUM << 24) | values.len() as u32);
            self.w(4);
            for &(m, v) in values {
                let mn = self.s(m);
                self.w(mn);
                self.w(v as u32);
            }
        }
        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC.to_le_bytes());
            b.push(1);
            b.push(0);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&self.types);
            b.extend_from_slice(&self.strings);
            b
        }
    }

    pub(crate) const STRUCT: u32 = KIND_STRUCT;
    pub(crate) const UNION: u32 = KIND_UNION;

    #[test]
    fn offsets_through_anonymous_unions_and_enums() {
        let mut b = Builder::new();
        b.int("long", 8); // 1
                          // 2: anonymous struct { long mapping; long index; }
        b.strukt(STRUCT, "", 16, &[("mapping", 1, 0), ("index", 1, 64)]);
        // 3: anonymous union { struct 2; long other; }
        b.strukt(UNION, "", 16, &[("", 2, 0), ("other", 1, 0)]);
        // 4: struct page { long flags; union 3; }
        b.strukt(STRUCT, "page", 24, &[("flags", 1, 0), ("", 3, 64)]);
        b.enm("pageflags", &[("PG_locked", 0), ("PG_reserved", 10)]);
        let btf = Btf::parse(&b.bytes()).unwrap();
        assert_eq!(btf.len(), 5);
        assert_eq!(btf.offset("page", "index").unwrap(), 16);
        assert_eq!(btf.offset("page", "mapping").unwrap(), 8);
        assert_eq!(btf.struct_size("page").unwrap(), 24);
        assert_eq!(btf.enumerator("PG_reserved").unwrap(), 10);
        assert!(btf
            .offset("page", "nope")
            .unwrap_err()
            .to_string()
            .contains("page.nope"));
        assert!(btf.enumerator("PG_nope").is_err());
        let mut bad = b.bytes();
        bad[0] = 0;
        assert!(Btf::parse(&bad).is_err());
        let short = b.bytes();
        assert!(Btf::parse(&short[..short.len() - 3]).is_err());
    }
}
