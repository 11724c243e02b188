//! Exit dispatch: what the vCPU loop does about one [`Exit`].
//!
//! [`dispatch`] routes device accesses to the buses and maps everything else to an
//! [`Action`]; it has no other side effects, so each case is unit-tested below.

use crate::devices::bus::Bus;
use crate::hypervisor::Exit;
use kscope_guest::abi::layout::ports;

/// A guest fault that ends the VM (the vCPU loop adds RIP and console context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Access to a port without a device.
    UnknownPort(u16),
    /// Access to a non-RAM address without a device.
    UnknownMmio(u64),
    /// Triple fault.
    TripleFault,
    /// Emulation failure.
    InternalError(u32),
    /// VM entry failed.
    FailEntry(u64),
    /// An exit the VMM does not handle.
    Unhandled(String),
}

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// The guest halted: deliver requests or wait for work, then re-enter.
    Idle,
    /// The run was interrupted by a kick: look at control messages.
    Interrupted,
    /// The guest reported READY with this value.
    Ready(u32),
    /// The guest kernel reported the CPU mode it runs in (a `cpu_mode` value).
    CpuMode(u32),
    /// The guest powered off with this exit code.
    PowerOff(u32),
    /// The guest kernel panicked with this code.
    GuestPanic(u32),
    /// The guest did something fatal.
    Fault(Fault),
}

/// Little-endian value of a 1/2/4-byte port write.
fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Decide what to do about `exit`, performing device accesses through `io` and `mmio`.
pub fn dispatch(exit: Exit<'_>, io: &Bus, mmio: &Bus) -> Action {
    match exit {
        Exit::IoOut { port, data } => match port {
            ports::POWEROFF => Action::PowerOff(port_value(data)),
            ports::PANIC => Action::GuestPanic(port_value(data)),
            ports::READY => Action::Ready(port_value(data)),
            ports::CPU_MODE => Action::CpuMode(port_value(data)),
            _ if io.write(u64::from(port), data) => Action::Continue,
            _ => Action::Fault(Fault::UnknownPort(port)),
        },
        Exit::IoIn { port, data } => match port {
            ports::POWEROFF | ports::PANIC | ports::READY | ports::CPU_MODE => {
                data.fill(0);
                Action::Continue
            }
            _ if io.read(u64::from(port), data) => Action::Continue,
            _ => Action::Fault(Fault::UnknownPort(port)),
        },
        Exit::MmioRead { addr, data } => {
            if mmio.read(addr, data) {
                Action::Continue
            } else {
                Action::Fault(Fault::UnknownMmio(addr))
            }
        }
        Exit::MmioWrite { addr, data } => {
            if mmio.write(addr, data) {
                Action::Continue
            } else {
                Action::Fault(Fault::UnknownMmio(addr))
            }
        }
        Exit::Hlt => Action::Idle,
        Exit::Interrupted => Action::Interrupted,
        Exit::Shutdown => Action::Fault(Fault::TripleFault),
        Exit::InternalError { suberror } => Action::Fault(Fault::InternalError(suberror)),
        Exit::FailEntry { reason } => Action::Fault(Fault::FailEntry(reason)),
        Exit::Unknown(what) => Action::Fault(Fault::Unhandled(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Log {
        writes: Vec<(u64, Vec<u8>)>,
    }
    struct Dev(Arc<Mutex<Log>>);
    impl BusDevice for Dev {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().writes.push((offset, data.to_vec()));
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut io = Bus::new();
        io.insert(0x3f8, 8, Arc::new(Mutex::new(Dev(log.clone()))))
            .unwrap();
        let mut mmio = Bus::new();
        mmio.insert(0xc000_0000, 0x1000, Arc::new(Mutex::new(Dev(log.clone()))))
            .unwrap();
        (io, mmio, log)
    }

    #[test]
    fn control_ports() {
        let (io, mmio, _) = buses();
        let d = 7u32.to_le_bytes();
        let out = |port| dispatch(Exit::IoOut { port, data: &d }, &io, &mmio);
        assert_eq!(out(ports::POWEROFF), Action::PowerOff(7));
        assert_eq!(out(ports::PANIC), Action::GuestPanic(7));
        assert_eq!(out(ports::READY), Action::Ready(7));
        assert_eq!(out(ports::CPU_MODE), Action::CpuMode(7));
        // A one-byte outb to POWEROFF.
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: ports::POWEROFF,
                    data: &[3]
                },
                &io,
                &mmio
            ),
            Action::PowerOff(3)
        );
        let mut b = [0xffu8; 4];
        assert_eq!(
            dispatch(
                Exit::IoIn {
                    port: ports::READY,
                    data: &mut b
                },
                &io,
                &mmio
            ),
            Action::Continue
        );
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn port_io_reaches_devices() {
        let (io, mmio, log) = buses();
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: 0x3f8,
                    data: b"h"
                },
                &io,
                &mmio
            ),
            Action::Continue
        );
        assert_eq!(log.lock().unwrap().writes, vec![(0, b"h".to_vec())]);
        let mut b = [0u8];
        assert_eq!(
            dispatch(
                Exit::IoIn {
                    port: 0x3fd,
                    data: &mut b
                },
                &io,
                &mmio
            ),
            Action::Continue
        );
        assert_eq!(b, [6]);
    }

    #[test]
    fn unknown_ports_fault() {
        let (io, mmio, _) = buses();
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: 0x80,
                    data: &[0]
                },
                &io,
                &mmio
            ),
            Action::Fault(Fault::UnknownPort(0x80))
        );
        let mut b = [0u8; 2];
        assert_eq!(
            dispatch(
                Exit::IoIn {
                    port: 0x2f8,
                    data: &mut b
                },
                &io,
                &mmio
            ),
            Action::Fault(Fault::UnknownPort(0x2f8))
        );
    }

    #[test]
    fn mmio_reaches_devices_or_faults() {
        let (io, mmio, log) = buses();
        let mut b = [0u8; 4];
        assert_eq!(
            dispatch(
                Exit::MmioRead {
                    addr: 0xc000_0010,
                    data: &mut b
                },
                &io,
                &mmio
            ),
            Action::Continue
        );
        assert_eq!(b, [0x11; 4]);
        assert_eq!(
            dispatch(
                Exit::MmioWrite {
                    addr: 0xc000_0050,
                    data: &[1, 0, 0, 0]
                },
                &io,
                &mmio
            ),
            Action::Continue
        );
        assert_eq!(log.lock().unwrap().writes, vec![(0x50, vec![1, 0, 0, 0])]);
        assert_eq!(
            dispatch(
                Exit::MmioRead {
                    addr: 0xd000_0000,
                    data: &mut b
                },
                &io,
                &mmio
            ),
            Action::Fault(Fault::UnknownMmio(0xd000_0000))
        );
        assert_eq!(
            dispatch(
                Exit::MmioWrite {
                    addr: 0xc000_0ffe,
                    data: &[0; 4]
                },
                &io,
                &mmio
            ),
            Action::Fault(Fault::UnknownMmio(0xc000_0ffe))
        );
    }

    #[test]
    fn cpu_events() {
        let (io, mmio, _) = buses();
        assert_eq!(dispatch(Exit::Hlt, &io, &mmio), Action::Idle);
        assert_eq!(dispatch(Exit::Interrupted, &io, &mmio), Action::Interrupted);
        assert_eq!(
            dispatch(Exit::Shutdown, &io, &mmio),
            Action::Fault(Fault::TripleFault)
        );
        assert_eq!(
            dispatch(Exit::InternalError { suberror: 1 }, &io, &mmio),
            Action::Fault(Fault::InternalError(1))
        );
        assert_eq!(
            dispatch(Exit::FailEntry { reason: 0x21 }, &io, &mmio),
            Action::Fault(Fault::FailEntry(0x21))
        );
        assert_eq!(
            dispatch(Exit::Unknown("Debug".into()), &io, &mmio),
            Action::Fault(Fault::Unhandled("Debug".into()))
        );
    }
}
