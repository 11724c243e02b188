//! The kernel RNG: ChaCha20 (RFC 8439 block function, integer code only) with fast key
//! erasure: every request rekeys from the keystream, so earlier outputs cannot be recovered.
//! Seeded from the clone-generation page's host seed and the TSC, reseeded on every clone.

use crate::arch::KCell;

struct Rng {
    key: [u32; 8],
    counter: u64,
}

static RNG: KCell<Rng> = KCell::new(Rng {
    key: [0; 8],
    counter: 0,
});

fn qr(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// One ChaCha20 block for `key`, block `counter` and nonce `nonce`.
pub fn block(key: &[u32; 8], counter: u32, nonce: [u32; 3]) -> [u32; 16] {
    let mut init = [0u32; 16];
    init[0] = 0x6170_7865;
    init[1] = 0x3320_646e;
    init[2] = 0x7962_2d32;
    init[3] = 0x6b20_6574;
    init[4..12].copy_from_slice(key);
    init[12] = counter;
    init[13..16].copy_from_slice(&nonce);
    let mut s = init;
    for _ in 0..10 {
        qr(&mut s, 0, 4, 8, 12);
        qr(&mut s, 1, 5, 9, 13);
        qr(&mut s, 2, 6, 10, 14);
        qr(&mut s, 3, 7, 11, 15);
        qr(&mut s, 0, 5, 10, 15);
        qr(&mut s, 1, 6, 11, 12);
        qr(&mut s, 2, 7, 8, 13);
        qr(&mut s, 3, 4, 9, 14);
    }
    for i in 0..16 {
        s[i] = s[i].wrapping_add(init[i]);
    }
    s
}

impl Rng {
    fn next_block(&mut self) -> [u32; 16] {
        let c = self.counter;
        self.counter = self.counter.wrapping_add(1);
        block(
            &self.key,
            c as u32,
            [(c >> 32) as u32, 0x6b73_636f, 0x7065_726e],
        )
    }

    fn rekey(&mut self) {
        let b = self.next_block();
        self.key.copy_from_slice(&b[..8]);
    }

    fn mix(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(32) {
            for (i, &b) in chunk.iter().enumerate() {
                self.key[i / 4] ^= (b as u32) << ((i % 4) * 8);
            }
            self.rekey();
        }
        self.rekey();
    }
}

/// Mix `bytes` into the key and rekey.
pub fn reseed(bytes: &[u8]) {
    let r = RNG.get();
    let tsc = crate::arch::rdtsc();
    r.key[7] ^= tsc as u32;
    r.key[6] ^= (tsc >> 32) as u32;
    r.mix(bytes);
}

/// Fill `out` with random bytes.
pub fn fill(out: &mut [u8]) {
    let r = RNG.get();
    for chunk in out.chunks_mut(64) {
        let b = r.next_block();
        for (i, o) in chunk.iter_mut().enumerate() {
            *o = (b[i / 4] >> ((i % 4) * 8)) as u8;
        }
    }
    r.rekey();
}
