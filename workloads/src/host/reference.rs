//! Reference answers computed on the host, independently of the guest engines: straight
//! `f64` TPC-H arithmetic over the generator's rows, a byte-oriented AES built from
//! log/antilog tables, a naive matrix product, a separate LZ decoder, and a hand-written JSON
//! writer for the expected `json` answer.

use crate::data::func::Person;
use crate::data::tpch::{days_from_civil, LineItem};
use crate::util::{fnv1a64, Rng};

/// One Q1 group: `(returnflag, linestatus, [sum_qty, sum_base_price, sum_disc_price,
/// sum_charge, avg_qty, avg_price, avg_disc], count)`.
pub type Q1Row = (char, char, [f64; 7], u64);

/// TPC-H Q1 over `rows`.
pub fn q1(rows: &[LineItem], delta: i32) -> Vec<Q1Row> {
    let cutoff = days_from_civil(1998, 12, 1) - delta;
    let mut groups: std::collections::BTreeMap<(char, char), ([f64; 5], u64)> = Default::default();
    for r in rows.iter().filter(|r| r.shipdate <= cutoff) {
        let price = r.extendedprice as f64 / 100.0;
        let disc = r.discount as f64 / 100.0;
        let tax = r.tax as f64 / 100.0;
        let g = groups
            .entry((r.returnflag as char, r.linestatus as char))
            .or_default();
        g.0[0] += r.quantity as f64;
        g.0[1] += price;
        g.0[2] += price * (1.0 - disc);
        g.0[3] += price * (1.0 - disc) * (1.0 + tax);
        g.0[4] += disc;
        g.1 += 1;
    }
    groups
        .into_iter()
        .map(|((f, s), (v, n))| {
            let c = n as f64;
            (
                f,
                s,
                [v[0], v[1], v[2], v[3], v[0] / c, v[1] / c, v[4] / c],
                n,
            )
        })
        .collect()
}

/// TPC-H Q6 revenue over `rows`.
pub fn q6(rows: &[LineItem], date: i32, discount: f64, quantity: f64) -> f64 {
    let (y, m, d) = crate::data::tpch::civil_from_days(date);
    let end = days_from_civil(y + 1, m, d);
    rows.iter()
        .filter(|r| {
            let disc = r.discount as f64 / 100.0;
            r.shipdate >= date
                && r.shipdate < end
                && disc >= discount - 0.01 - 1e-9
                && disc <= discount + 0.01 + 1e-9
                && (r.quantity as f64) < quantity
        })
        .map(|r| r.extendedprice as f64 / 100.0 * (r.discount as f64 / 100.0))
        .sum()
}

/// Q18 on lineitem: `(orderkey, total quantity)`, largest first.
pub fn q18(rows: &[LineItem], quantity: u64, limit: usize) -> Vec<(u64, u64)> {
    let mut sums: std::collections::HashMap<u64, u64> = Default::default();
    for r in rows {
        *sums.entry(r.orderkey).or_default() += r.quantity as u64;
    }
    let mut v: Vec<(u64, u64)> = sums.into_iter().filter(|&(_, q)| q > quantity).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(limit);
    v
}

/// Byte-oriented AES-128 (FIPS-197 structure: SubBytes, ShiftRows, MixColumns,
/// AddRoundKey), S-box from log/antilog tables of generator 3.
pub struct RefAes {
    round_keys: [[u8; 16]; 11],
    sbox: [u8; 256],
}

fn xtime(a: u8) -> u8 {
    (a << 1) ^ if a & 0x80 != 0 { 0x1b } else { 0 }
}

impl RefAes {
    /// Expand `key`.
    pub fn new(key: &[u8; 16]) -> Self {
        let (mut exp, mut log) = ([0u8; 256], [0u8; 256]);
        let mut x = 1u8;
        for (i, e) in exp.iter_mut().enumerate().take(255) {
            *e = x;
            log[x as usize] = i as u8;
            x ^= xtime(x); // multiply by 3
        }
        let mut sbox = [0u8; 256];
        for (i, s) in sbox.iter_mut().enumerate() {
            let inv = if i == 0 {
                0
            } else {
                exp[(255 - log[i] as usize) % 255]
            };
            let mut r = 0x63u8;
            for k in 0..5 {
                r ^= inv.rotate_left(k);
            }
            *s = r;
        }
        let mut w = [[0u8; 4]; 44];
        for i in 0..4 {
            w[i].copy_from_slice(&key[4 * i..4 * i + 4]);
        }
        let mut rcon = 1u8;
        for i in 4..44 {
            let mut t = w[i - 1];
            if i % 4 == 0 {
                t = [
                    sbox[t[1] as usize] ^ rcon,
                    sbox[t[2] as usize],
                    sbox[t[3] as usize],
                    sbox[t[0] as usize],
                ];
                rcon = xtime(rcon);
            }
            for k in 0..4 {
                w[i][k] = w[i - 4][k] ^ t[k];
            }
        }
        let mut round_keys = [[0u8; 16]; 11];
        for (r, rk) in round_keys.iter_mut().enumerate() {
            for c in 0..4 {
                rk[4 * c..4 * c + 4].copy_from_slice(&w[4 * r + c]);
            }
        }
        RefAes { round_keys, sbox }
    }

    /// Encrypt one block.
    pub fn encrypt(&self, block: &[u8; 16]) -> [u8; 16] {
        let mut s = *block;
        let add = |s: &mut [u8; 16], k: &[u8; 16]| s.iter_mut().zip(k).for_each(|(a, b)| *a ^= b);
        add(&mut s, &self.round_keys[0]);
        for round in 1..=10 {
            for b in s.iter_mut() {
                *b = self.sbox[*b as usize];
            }
            // ShiftRows: state byte (row r, column c) is s[4c + r].
            let t = s;
            for c in 0..4 {
                for r in 0..4 {
                    s[4 * c + r] = t[4 * ((c + r) % 4) + r];
                }
            }
            if round != 10 {
                for c in 0..4 {
                    let a = [s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]];
                    let all = a[0] ^ a[1] ^ a[2] ^ a[3];
                    for r in 0..4 {
                        s[4 * c + r] = a[r] ^ all ^ xtime(a[r] ^ a[(r + 1) % 4]);
                    }
                }
            }
            add(&mut s, &self.round_keys[round]);
        }
        s
    }

    /// CTR mode with a 128-bit big-endian counter.
    pub fn ctr(&self, counter: [u8; 16], data: &[u8]) -> Vec<u8> {
        let mut ctr = counter;
        let mut out = Vec::with_capacity(data.len());
        for chunk in data.chunks(16) {
            let ks = self.encrypt(&ctr);
            out.extend(chunk.iter().zip(ks).map(|(a, b)| a ^ b));
            for b in ctr.iter_mut().rev() {
                *b = b.wrapping_add(1);
                if *b != 0 {
                    break;
                }
            }
        }
        out
    }
}

/// Decode a `KLZ1` stream (see [`crate::func::compress`]).
pub fn lz_decode(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.len() < 8 || &data[..4] != b"KLZ1" {
        return Err("missing KLZ1 header".into());
    }
    let n = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    let mut out = Vec::with_capacity(n);
    let mut p = 8;
    let byte = |p: &mut usize| -> Result<u8, String> {
        let b = *data.get(*p).ok_or("truncated stream")?;
        *p += 1;
        Ok(b)
    };
    let ext = |p: &mut usize, mut v: usize| -> Result<usize, String> {
        if v == 15 {
            loop {
                let b = byte(p)?;
                v += b as usize;
                if b != 255 {
                    break;
                }
            }
        }
        Ok(v)
    };
    while p < data.len() {
        let token = byte(&mut p)?;
        let lits = ext(&mut p, (token >> 4) as usize)?;
        out.extend_from_slice(data.get(p..p + lits).ok_or("literals past the end")?);
        p += lits;
        if p == data.len() {
            break;
        }
        let off = u16::from_le_bytes([byte(&mut p)?, byte(&mut p)?]) as usize;
        let len = ext(&mut p, (token & 15) as usize)? + 4;
        if off == 0 || off > out.len() {
            return Err(format!("bad match offset {off} at output {}", out.len()));
        }
        for _ in 0..len {
            out.push(out[out.len() - off]);
        }
    }
    if out.len() != n {
        return Err(format!("decoded {} bytes, header says {n}", out.len()));
    }
    Ok(out)
}

/// Naive matrix product answer (same generator as the guest: the inputs are part of the
/// request's definition).
pub fn matmul_answer(n: usize, seed: u64) -> String {
    let mut rng = Rng::derive(seed, "matmul");
    let mut gen = || {
        (0..n * n)
            .map(|_| (rng.range(0, 2048) as f64 - 1024.0) / 1024.0)
            .collect::<Vec<_>>()
    };
    let a = gen();
    let b = gen();
    let mut c = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            c[i * n + j] = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
        }
    }
    let trace: f64 = (0..n).map(|i| c[i * n + i]).sum();
    let sum: f64 = c.iter().sum();
    let bytes: Vec<u8> = c.iter().flat_map(|v| v.to_le_bytes()).collect();
    format!(
        "{{\"n\":{n},\"seed\":{seed},\"trace\":{trace},\"sum\":{sum},\"fnv64\":\"{:016x}\"}}",
        fnv1a64(&bytes)
    )
}

/// The expected answer of `json` for input `dataset` with `records`.
pub fn json_answer(dataset: &str, records: &[Person]) -> String {
    let mut out: Vec<(u64, String, String, u64, u32, String)> = records
        .iter()
        .filter(|p| p.active && !p.purchases.is_empty())
        .map(|p| {
            let total = p.purchases.iter().map(|b| b.qty as u64 * b.cents).sum();
            let items = p.purchases.iter().map(|b| b.qty).sum();
            (
                p.id,
                p.name.clone(),
                p.city.clone(),
                total,
                items,
                p.tags.join(","),
            )
        })
        .collect();
    out.sort_by(|a, b| b.3.cmp(&a.3).then(a.0.cmp(&b.0)));
    let rec = |r: &(u64, String, String, u64, u32, String)| {
        format!(
            "{{\"id\":{},\"name\":\"{}\",\"city\":\"{}\",\"total_cents\":{},\"items\":{},\"tags\":\"{}\"}}",
            r.0, r.1, r.2, r.3, r.4, r.5
        )
    };
    let all: Vec<String> = out.iter().map(rec).collect();
    let doc = format!(
        "{{\"dataset\":\"{dataset}\",\"count\":{},\"records\":[{}]}}",
        out.len(),
        all.join(",")
    );
    format!(
        "{{\"dataset\":\"{dataset}\",\"input_records\":{},\"output_records\":{},\"output_bytes\":{},\"fnv64\":\"{:016x}\",\"top\":[{}]}}",
        records.len(),
        out.len(),
        doc.len(),
        fnv1a64(doc.as_bytes()),
        all[..all.len().min(3)].join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_aes_matches_fips197() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let pt: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let ct = RefAes::new(&key).encrypt(&pt);
        assert_eq!(
            ct,
            [
                0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
                0xc5, 0x5a
            ]
        );
    }

    #[test]
    fn lz_decoder_rejects_garbage() {
        assert!(lz_decode(b"nope").is_err());
        assert!(lz_decode(b"KLZ1\x05\0\0\0\x50abc").is_err());
        assert_eq!(lz_decode(b"KLZ1\x03\0\0\0\x30abc").unwrap(), b"abc");
    }
}
