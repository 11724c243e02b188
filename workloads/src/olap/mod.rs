//! The `olap` workload: TPC-H queries over `/data/tpch/lineitem.tbl` (see
//! [`crate::data::tpch`] for the layout).
//!
//! The engine maps the table (page-cache pages, faulted in as it scans), uses the month zone
//! map to restrict date ranges, parses the needed columns of each row into fixed-point
//! integers and aggregates in the heap (a hash map per group). Requests (one line of text):
//!
//! - `Q1 [delta=D]` — pricing summary report for `l_shipdate <= 1998-12-01 - D days`
//!   (default D = 90);
//! - `Q6 [date=YYYY-MM-DD] [discount=0.DD] [quantity=Q]` — forecast revenue change (defaults
//!   1994-01-01, 0.06, 24);
//! - `Q18 [quantity=Q] [limit=N]` — large-volume orders: orders whose total quantity exceeds
//!   Q (default 300), largest first, at most N (default 100) lines.
//!
//! Answers are text: a first line `Qn <params> rows_scanned=N`, a header line of column
//! names, then `|`-separated result rows (money with two decimals, rounded half away from
//! zero from exact fixed-point sums).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use crate::data::tpch::{days_from_civil, fmt_date, parse_date, LINEITEM_IDX_PATH, LINEITEM_PATH};
use crate::files::{FileError, Files};
use crate::util::{fmt_fixed2, param, FxHashMap};

/// Why a query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The request is not a known query or a parameter is malformed.
    #[error("bad query: {0} (expected `Q1 delta=90`, `Q6 date=1994-01-01 discount=0.06 quantity=24` or `Q18 quantity=300 limit=100`)")]
    Bad(String),
    /// The table could not be read.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// TPC-H Q1 with its DELTA in days.
    Q1 {
        /// Days before 1998-12-01.
        delta: i32,
    },
    /// TPC-H Q6.
    Q6 {
        /// First ship date (days since 1970).
        date: i32,
        /// Discount in hundredths.
        discount: i64,
        /// Quantity bound (exclusive).
        quantity: i64,
    },
    /// TPC-H Q18 on lineitem alone.
    Q18 {
        /// Total-quantity threshold (exclusive).
        quantity: i64,
        /// Result rows at most.
        limit: usize,
    },
}

fn bad(msg: &str) -> QueryError {
    QueryError::Bad(msg.into())
}

fn num<T: core::str::FromStr>(rest: &str, key: &str, default: T) -> Result<T, QueryError> {
    match param(rest, key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| bad(&format!("`{key}` must be a number"))),
    }
}

/// Parse a decimal like `0.06`, `12`, `21168.23` into hundredths.
pub fn parse_hundredths(s: &str) -> Option<i64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 2 || int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut v: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    if v < 0 {
        return None;
    }
    let mut f = 0;
    for (i, c) in frac.bytes().enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        f += (c - b'0') as i64 * if i == 0 { 10 } else { 1 };
    }
    v = v.checked_mul(100)?.checked_add(f)?;
    Some(v)
}

impl Query {
    /// Parse a request payload.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        let text = text.trim();
        let (name, rest) = text.split_once(' ').unwrap_or((text, ""));
        match name {
            "Q1" | "q1" => {
                let delta = num(rest, "delta", 90)?;
                if !(0..=3650).contains(&delta) {
                    return Err(bad("`delta` must be 0..=3650"));
                }
                Ok(Query::Q1 { delta })
            }
            "Q6" | "q6" => {
                let date = match param(rest, "date") {
                    None => days_from_civil(1994, 1, 1),
                    Some(d) => parse_date(d).ok_or_else(|| bad("`date` must be YYYY-MM-DD"))?,
                };
                let discount = match param(rest, "discount") {
                    None => 6,
                    Some(d) => {
                        parse_hundredths(d).ok_or_else(|| bad("`discount` must be like 0.06"))?
                    }
                };
                let quantity = num(rest, "quantity", 24)?;
                Ok(Query::Q6 {
                    date,
                    discount,
                    quantity,
                })
            }
            "Q18" | "q18" => Ok(Query::Q18 {
                quantity: num(rest, "quantity", 300)?,
                limit: num(rest, "limit", 100)?,
            }),
            _ => Err(bad("unknown query")),
        }
    }
}

/// Parsed columns of one row that the queries use (fixed point: hundredths).
#[derive(Clone, Copy, Debug, Default)]
struct Row {
    orderkey: u64,
    quantity: i64,
    price: i64,
    discount: i64,
    tax: i64,
    returnflag: u8,
    linestatus: u8,
    shipdate: i32,
}

fn parse_row(line: &[u8]) -> Option<Row> {
    let s = core::str::from_utf8(line).ok()?;
    let mut f = s.split('|');
    let orderkey = f.next()?.parse().ok()?;
    let mut f = f.skip(3);
    let quantity = f.next()?.parse::<i64>().ok()? * 100;
    let price = parse_hundredths(f.next()?)?;
    let discount = parse_hundredths(f.next()?)?;
    let tax = parse_hundredths(f.next()?)?;
    let returnflag = *f.next()?.as_bytes().first()?;
    let linestatus = *f.next()?.as_bytes().first()?;
    let shipdate = parse_date(f.next()?)?;
    Some(Row {
        orderkey,
        quantity,
        price,
        discount,
        tax,
        returnflag,
        linestatus,
        shipdate,
    })
}

#[derive(Default, Clone, Copy)]
struct Q1Group {
    sum_qty: i64,
    sum_price: i64,
    sum_disc_price: i128,
    sum_charge: i128,
    sum_disc: i64,
    count: i64,
}

/// Rounded `num / den` in hundredths for values already in hundredths.
fn avg2(out: &mut String, num: i128, den: i64) {
    let den = den.max(1) as i128;
    let q = (2 * num + den) / (2 * den);
    fmt_fixed2(out, q, 2);
}

/// The engine: the mapped table, its zone map and reusable heap state.
pub struct Olap<F: Files> {
    files: F,
    table: Option<&'static [u8]>,
    zones: Vec<(i32, usize)>,
    q18: FxHashMap<u64, i64>,
}

impl<F: Files> Olap<F> {
    /// An engine over `files` (the table is mapped on first use).
    pub fn new(files: F) -> Self {
        Olap {
            files,
            table: None,
            zones: Vec::new(),
            q18: FxHashMap::default(),
        }
    }

    fn table(&mut self) -> Result<&'static [u8], QueryError> {
        if let Some(t) = self.table {
            return Ok(t);
        }
        let t = self.files.map(LINEITEM_PATH)?;
        let idx = self.files.map(LINEITEM_IDX_PATH)?;
        let text = core::str::from_utf8(idx)
            .map_err(|_| FileError::Malformed(LINEITEM_IDX_PATH.into()))?;
        for line in text.lines() {
            let mut f = line.split('|');
            let zone = (|| {
                let month = f.next()?;
                let start = parse_date(&format!("{month}-01"))?;
                let off: usize = f.next()?.parse().ok()?;
                (off <= t.len()).then_some((start, off))
            })();
            self.zones
                .push(zone.ok_or_else(|| FileError::Malformed(LINEITEM_IDX_PATH.into()))?);
        }
        self.table = Some(t);
        Ok(t)
    }

    /// Byte range of the table holding every row with ship date in `[lo, hi)`.
    fn range(&mut self, lo: i32, hi: i32) -> Result<&'static [u8], QueryError> {
        let t = self.table()?;
        let z = &self.zones;
        let first = z.partition_point(|&(m, _)| m <= lo).saturating_sub(1);
        let last = z.partition_point(|&(m, _)| m < hi);
        let start = z.get(first).map_or(0, |&(_, o)| o);
        let end = z.get(last).map_or(t.len(), |&(_, o)| o);
        Ok(&t[start.min(end)..end])
    }

    /// Run a request; returns the text answer.
    pub fn run(&mut self, request: &str) -> Result<String, QueryError> {
        match Query::parse(request)? {
            Query::Q1 { delta } => self.q1(delta),
            Query::Q6 {
                date,
                discount,
                quantity,
            } => self.q6(date, discount, quantity),
            Query::Q18 { quantity, limit } => self.q18(quantity, limit),
        }
    }

    fn scan(rows: &[u8], mut f: impl FnMut(&Row)) -> Result<u64, QueryError> {
        let mut n = 0;
        for line in rows.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let r = parse_row(line).ok_or_else(|| FileError::Malformed(LINEITEM_PATH.into()))?;
            f(&r);
            n += 1;
        }
        Ok(n)
    }

    fn q1(&mut self, delta: i32) -> Result<String, QueryError> {
        let cutoff = days_from_civil(1998, 12, 1) - delta;
        let rows = self.range(i32::MIN, cutoff + 1)?;
        let mut groups: FxHashMap<(u8, u8), Q1Group> = FxHashMap::default();
        let scanned = Self::scan(rows, |r| {
            if r.shipdate > cutoff {
                return;
            }
            let g = groups.entry((r.returnflag, r.linestatus)).or_default();
            let disc_price = r.price as i128 * (100 - r.discount) as i128;
            g.sum_qty += r.quantity;
            g.sum_price += r.price;
            g.sum_disc_price += disc_price;
            g.sum_charge += disc_price * (100 + r.tax) as i128;
            g.sum_disc += r.discount;
            g.count += 1;
        })?;
        let mut keys: Vec<_> = groups.keys().copied().collect();
        keys.sort_unstable();
        let mut out = format!("Q1 delta={delta} rows_scanned={scanned}\n");
        out.push_str("l_returnflag|l_linestatus|sum_qty|sum_base_price|sum_disc_price|sum_charge|avg_qty|avg_price|avg_disc|count_order\n");
        for k in keys {
            let g = groups[&k];
            let _ = write!(out, "{}|{}|", k.0 as char, k.1 as char);
            fmt_fixed2(&mut out, g.sum_qty as i128, 2);
            out.push('|');
            fmt_fixed2(&mut out, g.sum_price as i128, 2);
            out.push('|');
            fmt_fixed2(&mut out, g.sum_disc_price, 4);
            out.push('|');
            fmt_fixed2(&mut out, g.sum_charge, 6);
            out.push('|');
            avg2(&mut out, g.sum_qty as i128, g.count);
            out.push('|');
            avg2(&mut out, g.sum_price as i128, g.count);
            out.push('|');
            avg2(&mut out, g.sum_disc as i128, g.count);
            let _ = writeln!(out, "|{}", g.count);
        }
        Ok(out)
    }

    fn q6(&mut self, date: i32, discount: i64, quantity: i64) -> Result<String, QueryError> {
        let (y, m, d) = crate::data::tpch::civil_from_days(date);
        let end = days_from_civil(y + 1, m, d);
        let rows = self.range(date, end)?;
        let mut revenue: i128 = 0;
        let scanned = Self::scan(rows, |r| {
            if r.shipdate >= date
                && r.shipdate < end
                && (discount - 1..=discount + 1).contains(&r.discount)
                && r.quantity < quantity * 100
            {
                revenue += r.price as i128 * r.discount as i128;
            }
        })?;
        let mut out = String::from("Q6 date=");
        fmt_date(&mut out, date);
        out.push_str(" discount=");
        fmt_fixed2(&mut out, discount as i128, 2);
        let _ = write!(
            out,
            " quantity={quantity} rows_scanned={scanned}\nrevenue\n"
        );
        fmt_fixed2(&mut out, revenue, 4);
        out.push('\n');
        Ok(out)
    }

    fn q18(&mut self, quantity: i64, limit: usize) -> Result<String, QueryError> {
        let rows = self.range(i32::MIN, i32::MAX)?;
        let mut sums = core::mem::take(&mut self.q18);
        sums.clear();
        let scanned = Self::scan(rows, |r| *sums.entry(r.orderkey).or_insert(0) += r.quantity)?;
        let mut big: Vec<(u64, i64)> = sums
            .iter()
            .filter(|(_, &q)| q > quantity * 100)
            .map(|(&k, &q)| (k, q))
            .collect();
        big.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        big.truncate(limit);
        self.q18 = sums;
        let mut out = format!(
            "Q18 quantity={quantity} limit={limit} rows_scanned={scanned}\nl_orderkey|sum_qty\n"
        );
        for (k, q) in big {
            let _ = writeln!(out, "{k}|{}", q / 100);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_queries_and_decimals() {
        assert_eq!(Query::parse("Q1").unwrap(), Query::Q1 { delta: 90 });
        assert_eq!(
            Query::parse("Q6 date=1995-01-01 discount=0.05 quantity=25").unwrap(),
            Query::Q6 {
                date: days_from_civil(1995, 1, 1),
                discount: 5,
                quantity: 25
            }
        );
        assert_eq!(
            Query::parse("Q18 quantity=250").unwrap(),
            Query::Q18 {
                quantity: 250,
                limit: 100
            }
        );
        assert!(Query::parse("Q2").is_err());
        assert!(Query::parse("Q6 date=1995").is_err());
        assert!(Query::parse("Q1 delta=x").is_err());
        assert_eq!(parse_hundredths("21168.23"), Some(2_116_823));
        assert_eq!(parse_hundredths("0.06"), Some(6));
        assert_eq!(parse_hundredths("0.5"), Some(50));
        assert_eq!(parse_hundredths("17"), Some(1700));
        assert_eq!(parse_hundredths("1.234"), None);
        assert_eq!(parse_hundredths("-1"), None);
    }
}
