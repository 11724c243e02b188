//! Which CPU mode a guest kernel runs in, and how the VMM chooses it.
//!
//! On this platform's PVM hosts KVM interprets every guest-kernel instruction unless the
//! kernel registers a page with PVM's native switch (`kscope_guest::abi::boot::pvm`). The VMM
//! detects the switch, asks for a mode in the boot information, and the kernel reports the
//! mode it really runs in (port `CPU_MODE`, at boot and in every clone).

use std::fmt;
use std::str::FromStr;

use kscope_guest::abi::boot::cpu_mode;
use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// What the user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum GuestMode {
    /// Native where the host offers it, else the emulated mode (with a warning).
    #[default]
    Auto = 0,
    /// Native or an error: never a silent fallback.
    Native = 1,
    /// The instruction emulator (what hosts without the switch give every kernel).
    Emulated = 2,
}

/// The mode a kernel runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuMode {
    /// Kernel instructions interpreted by KVM.
    Emulated,
    /// Kernel on the hardware (PVM's native switch).
    Native,
}

impl CpuMode {
    /// The ABI value (`kscope_guest::abi::boot::cpu_mode`).
    pub fn abi(self) -> u32 {
        match self {
            CpuMode::Emulated => cpu_mode::EMULATED,
            CpuMode::Native => cpu_mode::NATIVE,
        }
    }

    /// From the value the kernel reports (`None` for an unknown value).
    pub fn from_abi(v: u32) -> Option<CpuMode> {
        match v {
            cpu_mode::EMULATED => Some(CpuMode::Emulated),
            cpu_mode::NATIVE => Some(CpuMode::Native),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuMode::Emulated => "emulated",
            CpuMode::Native => "native",
        }
    }
}

impl fmt::Display for CpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The process-wide default (`kscope --guest-mode`); [`GuestMode::Auto`] unless set.
static DEFAULT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl GuestMode {
    /// Set the default mode of VMs this process boots without an explicit choice (the CLI's
    /// global `--guest-mode`).
    pub fn set_process_default(self) {
        DEFAULT.store(self as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The default set by [`set_process_default`](Self::set_process_default).
    pub fn process_default() -> GuestMode {
        match DEFAULT.load(std::sync::atomic::Ordering::Relaxed) {
            1 => GuestMode::Native,
            2 => GuestMode::Emulated,
            _ => GuestMode::Auto,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestMode::Auto => "auto",
            GuestMode::Native => "native",
            GuestMode::Emulated => "emulated",
        }
    }

    /// The mode to boot in, given whether the host has the native switch. `Auto` without it
    /// falls back (the caller warns); `Native` without it is an error.
    pub fn resolve(self, native_available: bool) -> Result<CpuMode, VmError> {
        match (self, native_available) {
            (GuestMode::Emulated, _) | (GuestMode::Auto, false) => Ok(CpuMode::Emulated),
            (GuestMode::Native | GuestMode::Auto, true) => Ok(CpuMode::Native),
            (GuestMode::Native, false) => Err(VmError::ModeUnavailable(
                "guest mode 'native' asked for, but this host's KVM has no PVM native switch \
                 (MSR 0x4b564d11 does not read \"PVM\"); use --guest-mode auto or emulated"
                    .into(),
            )),
        }
    }
}

impl fmt::Display for GuestMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GuestMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(GuestMode::Auto),
            "native" => Ok(GuestMode::Native),
            "emulated" => Ok(GuestMode::Emulated),
            other => Err(format!(
                "unknown guest mode '{other}': use auto, native or emulated"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_host_and_native_never_falls_back() {
        assert_eq!(GuestMode::Auto.resolve(true).unwrap(), CpuMode::Native);
        assert_eq!(GuestMode::Auto.resolve(false).unwrap(), CpuMode::Emulated);
        assert_eq!(GuestMode::Native.resolve(true).unwrap(), CpuMode::Native);
        let e = GuestMode::Native.resolve(false).unwrap_err().to_string();
        assert!(e.contains("no PVM native switch"), "{e}");
        assert_eq!(
            GuestMode::Emulated.resolve(true).unwrap(),
            CpuMode::Emulated
        );
    }

    #[test]
    fn names_round_trip() {
        for m in [GuestMode::Auto, GuestMode::Native, GuestMode::Emulated] {
            assert_eq!(m.as_str().parse::<GuestMode>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert!("fast".parse::<GuestMode>().is_err());
        for c in [CpuMode::Emulated, CpuMode::Native] {
            assert_eq!(CpuMode::from_abi(c.abi()), Some(c));
        }
        assert_eq!(CpuMode::from_abi(7), None);
    }
}
