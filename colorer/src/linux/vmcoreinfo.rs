//! The kernel's `VMCOREINFO` text (what crash-dump tools read): `KEY=VALUE` lines such as
//! `OSRELEASE=6.1.0-48-cloud-amd64`, `SYMBOL(init_top_pgt)=ffffffff99c10000`,
//! `OFFSET(page.mapping)=24`, `SIZE(page)=64`, `NUMBER(PG_slab)=9`, `LENGTH(mem_section)=2048`,
//! `KERNELOFFSET=17200000`. Symbols and `KERNELOFFSET` are hexadecimal, the rest decimal
//! (`NUMBER` may be negative).

use std::collections::HashMap;

/// Errors of VMCOREINFO.
#[derive(Debug, thiserror::Error)]
pub enum VmcoreinfoError {
    /// The image carries no VMCOREINFO.
    #[error("the memory image has no VMCOREINFO note: dump it with qemu's `-device vmcoreinfo` and the guest's qemu_fw_cfg driver loaded (or from kdump's /proc/vmcore); the Linux profile reads nothing without it")]
    Missing,
    /// A key the profile needs is absent.
    #[error("VMCOREINFO has no {0}: this kernel ({1}) does not export it; the Linux profile needs it and does not guess it")]
    Absent(String, String),
    /// A value does not parse.
    #[error("VMCOREINFO line {key}={value} does not parse as a number")]
    BadValue {
        /// The key.
        key: String,
        /// Its text.
        value: String,
    },
}

/// Parsed VMCOREINFO.
#[derive(Clone, Debug, Default)]
pub struct Vmcoreinfo {
    map: HashMap<String, String>,
}

impl Vmcoreinfo {
    /// Parse the note's text (unknown lines are kept, malformed ones ignored).
    pub fn parse(text: &str) -> Self {
        let map = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Vmcoreinfo { map }
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// `OSRELEASE`.
    pub fn release(&self) -> &str {
        self.get("OSRELEASE").unwrap_or("unknown release")
    }

    fn need(&self, key: &str) -> Result<&str, VmcoreinfoError> {
        self.get(key)
            .ok_or_else(|| VmcoreinfoError::Absent(key.to_string(), self.release().to_string()))
    }

    fn bad(key: &str, value: &str) -> VmcoreinfoError {
        VmcoreinfoError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
        }
    }

    /// A hexadecimal value (`SYMBOL(...)`, `KERNELOFFSET`).
    pub fn hex(&self, key: &str) -> Result<u64, VmcoreinfoError> {
        let v = self.need(key)?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|_| Self::bad(key, v))
    }

    /// A decimal value, possibly negative (`NUMBER`, `OFFSET`, `SIZE`, `LENGTH`).
    pub fn dec(&self, key: &str) -> Result<i64, VmcoreinfoError> {
        let v = self.need(key)?;
        v.parse::<i64>().map_err(|_| Self::bad(key, v))
    }

    /// `SYMBOL(name)`.
    pub fn symbol(&self, name: &str) -> Result<u64, VmcoreinfoError> {
        self.hex(&format!("SYMBOL({name})"))
    }

    /// `OFFSET(struct.field)`.
    pub fn offset(&self, field: &str) -> Result<u64, VmcoreinfoError> {
        let k = format!("OFFSET({field})");
        let v = self.dec(&k)?;
        u64::try_from(v).map_err(|_| Self::bad(&k, &v.to_string()))
    }

    /// `SIZE(type)`.
    pub fn size(&self, ty: &str) -> Result<u64, VmcoreinfoError> {
        let k = format!("SIZE({ty})");
        let v = self.dec(&k)?;
        u64::try_from(v).map_err(|_| Self::bad(&k, &v.to_string()))
    }

    /// `NUMBER(name)`.
    pub fn number(&self, name: &str) -> Result<i64, VmcoreinfoError> {
        self.dec(&format!("NUMBER({name})"))
    }

    /// `LENGTH(name)`.
    pub fn length(&self, name: &str) -> Result<u64, VmcoreinfoError> {
        let k = format!("LENGTH({name})");
        let v = self.dec(&k)?;
        u64::try_from(v).map_err(|_| Self::bad(&k, &v.to_string()))
    }

    /// True if `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kinds_of_lines() {
        let v = Vmcoreinfo::parse(
            "OSRELEASE=6.1.0-48-cloud-amd64\nSYMBOL(_stext)=ffffffff98200000\nOFFSET(page.mapping)=24\n\
             NUMBER(phys_base)=-220200960\nKERNELOFFSET=17200000\ngarbage\n",
        );
        assert_eq!(v.release(), "6.1.0-48-cloud-amd64");
        assert_eq!(v.symbol("_stext").unwrap(), 0xffff_ffff_9820_0000);
        assert_eq!(v.offset("page.mapping").unwrap(), 24);
        assert_eq!(v.number("phys_base").unwrap(), -220_200_960);
        assert_eq!(v.hex("KERNELOFFSET").unwrap(), 0x1720_0000);
        let e = v.offset("page.flags").unwrap_err().to_string();
        assert!(
            e.contains("OFFSET(page.flags)") && e.contains("6.1.0-48"),
            "{e}"
        );
        assert!(Vmcoreinfo::parse("SIZE(page)=x")
            .size("page")
            .unwrap_err()
            .to_string()
            .contains("does not parse"));
    }
}
