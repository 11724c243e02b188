//! Serial console (16550 COM1, transmit register only) and number printing without
//! `core::fmt` (whose precompiled code uses SSE, which the kernel must never execute).

use kscope_guest::abi::layout::ports;

use crate::arch::outb;

/// Write bytes to the console.
pub fn write(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            outb(ports::SERIAL_COM1, b'\r');
        }
        outb(ports::SERIAL_COM1, b);
    }
}

/// Write a string.
pub fn puts(s: &str) {
    write(s.as_bytes());
}

/// Write `v` in hexadecimal with a `0x` prefix.
pub fn hex(v: u64) {
    let mut buf = [0u8; 18];
    buf[0] = b'0';
    buf[1] = b'x';
    let mut n = 2;
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            buf[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n += 1;
        }
    }
    write(&buf[..n]);
}

/// Write `v` in decimal.
pub fn dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    write(&buf[i..]);
}

/// Write a NUL-padded name.
pub fn name(n: &[u8]) {
    let len = n.iter().position(|&b| b == 0).unwrap_or(n.len());
    write(&n[..len]);
}

/// `kprint!("text", hex v, dec v, name n, ...)`: print pieces without `core::fmt`.
#[macro_export]
macro_rules! kprint {
    ($($kind:ident $e:expr),* $(,)?) => {{
        $( $crate::kprint!(@one $kind $e); )*
    }};
    (@one s $e:expr) => { $crate::console::puts($e) };
    (@one x $e:expr) => { $crate::console::hex($e as u64) };
    (@one d $e:expr) => { $crate::console::dec($e as u64) };
    (@one n $e:expr) => { $crate::console::name(&$e[..]) };
}
