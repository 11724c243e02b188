//! TPC-H-like `lineitem` table (the `olap` workload's data).
//!
//! `/data/tpch/lineitem.tbl` is dbgen's text layout, one row per line, columns separated and
//! terminated by `|`:
//!
//! ```text
//! orderkey|partkey|suppkey|linenumber|quantity|extendedprice|discount|tax|returnflag|
//! linestatus|shipdate|commitdate|receiptdate|shipinstruct|shipmode|comment|
//! ```
//!
//! with dbgen's value rules (quantity 1-50, extendedprice = quantity x the part's retail
//! price, discount 0.00-0.10, tax 0.00-0.08, shipdate = orderdate + 1-121 days, returnflag
//! R/A for items received by 1995-06-17 else N, linestatus F for items shipped by then else O).
//! Unlike dbgen's order-key order, rows are **clustered by shipdate** (like a table with a
//! clustered index on it), and `/data/tpch/lineitem.idx` is a zone map: lines
//! `YYYY-MM|byte offset|row index` for the first row of each month, so date-restricted queries
//! scan only their months.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use super::ImageOptions;
use crate::util::Rng;

/// Path of the table.
pub const LINEITEM_PATH: &str = "/data/tpch/lineitem.tbl";
/// Path of the month zone map.
pub const LINEITEM_IDX_PATH: &str = "/data/tpch/lineitem.idx";

/// Days since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

/// Civil date `(y, m, d)` of days since 1970-01-01.
pub fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u32;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe as i32 + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// Parse `YYYY-MM-DD` into days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i32 = s[0..4].parse().ok()?;
    let m: u32 = s[5..7].parse().ok()?;
    let d: u32 = s[8..10].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// Format days since 1970-01-01 as `YYYY-MM-DD`.
pub fn fmt_date(out: &mut String, days: i32) {
    let (y, m, d) = civil_from_days(days);
    let _ = write!(out, "{y:04}-{m:02}-{d:02}");
}

/// The date after which items are "open" (dbgen's CURRENTDATE, 1995-06-17).
pub fn current_date() -> i32 {
    days_from_civil(1995, 6, 17)
}

const INSTRUCT: [&str; 4] = [
    "DELIVER IN PERSON",
    "COLLECT COD",
    "NONE",
    "TAKE BACK RETURN",
];
const MODES: [&str; 7] = ["REG AIR", "AIR", "RAIL", "SHIP", "TRUCK", "MAIL", "FOB"];
const COMMENT: [&str; 16] = [
    "carefully",
    "final",
    "deposits",
    "sleep",
    "quickly",
    "ironic",
    "requests",
    "boost",
    "furiously",
    "regular",
    "accounts",
    "haggle",
    "blithely",
    "pending",
    "foxes",
    "nag",
];

/// One row of `lineitem`.
#[derive(Clone, Debug, PartialEq)]
pub struct LineItem {
    /// Order key.
    pub orderkey: u64,
    /// Part key.
    pub partkey: u32,
    /// Supplier key.
    pub suppkey: u32,
    /// Line number within the order (1-7).
    pub linenumber: u8,
    /// Quantity (1-50).
    pub quantity: u32,
    /// Extended price in cents.
    pub extendedprice: i64,
    /// Discount in hundredths (0-10).
    pub discount: u8,
    /// Tax in hundredths (0-8).
    pub tax: u8,
    /// `R`, `A` or `N`.
    pub returnflag: u8,
    /// `O` or `F`.
    pub linestatus: u8,
    /// Ship date (days since 1970-01-01).
    pub shipdate: i32,
    /// Commit date.
    pub commitdate: i32,
    /// Receipt date.
    pub receiptdate: i32,
    /// Ship instruction.
    pub shipinstruct: &'static str,
    /// Ship mode.
    pub shipmode: &'static str,
    /// Comment.
    pub comment: String,
}

/// Part retail price in cents (dbgen's formula).
pub fn retail_price(partkey: u32) -> i64 {
    90_000 + ((partkey / 10) % 20_001) as i64 + 100 * (partkey % 1000) as i64
}

/// Generate about `opts.olap_rows` rows (whole orders), sorted by ship date.
pub fn generate(opts: &ImageOptions) -> Vec<LineItem> {
    let mut rng = Rng::derive(opts.seed, "tpch-lineitem");
    let parts = (opts.olap_rows / 3).max(100) as u32;
    let start = days_from_civil(1992, 1, 1);
    let end = days_from_civil(1998, 12, 31) - 151;
    let cur = current_date();
    let mut rows = Vec::with_capacity(opts.olap_rows as usize + 8);
    let mut order = 0u64;
    while (rows.len() as u64) < opts.olap_rows {
        order += 1;
        let orderkey = (order / 8) * 32 + order % 8;
        let orderdate = rng.range(start as u64, end as u64) as i32;
        for line in 1..=rng.range(1, 7) as u8 {
            let partkey = rng.range(1, parts as u64) as u32;
            let quantity = rng.range(1, 50) as u32;
            let shipdate = orderdate + rng.range(1, 121) as i32;
            let receiptdate = shipdate + rng.range(1, 30) as i32;
            let returnflag = if receiptdate <= cur {
                if rng.range(0, 1) == 0 {
                    b'R'
                } else {
                    b'A'
                }
            } else {
                b'N'
            };
            let mut comment = String::new();
            for i in 0..rng.range(2, 5) {
                if i > 0 {
                    comment.push(' ');
                }
                comment.push_str(COMMENT[rng.range(0, 15) as usize]);
            }
            rows.push(LineItem {
                orderkey,
                partkey,
                suppkey: (partkey + line as u32 * 7919) % 10_000 + 1,
                linenumber: line,
                quantity,
                extendedprice: quantity as i64 * retail_price(partkey),
                discount: rng.range(0, 10) as u8,
                tax: rng.range(0, 8) as u8,
                returnflag,
                linestatus: if shipdate > cur { b'O' } else { b'F' },
                shipdate,
                commitdate: orderdate + rng.range(30, 90) as i32,
                receiptdate,
                shipinstruct: INSTRUCT[rng.range(0, 3) as usize],
                shipmode: MODES[rng.range(0, 6) as usize],
                comment,
            });
        }
    }
    rows.sort_by_key(|r| (r.shipdate, r.orderkey, r.linenumber));
    rows
}

fn cents(out: &mut String, v: i64) {
    let _ = write!(out, "{}.{:02}", v / 100, v % 100);
}

/// One row in the table's text layout (with the trailing newline).
pub fn format_row(out: &mut String, r: &LineItem) {
    let _ = write!(
        out,
        "{}|{}|{}|{}|{}|",
        r.orderkey, r.partkey, r.suppkey, r.linenumber, r.quantity
    );
    cents(out, r.extendedprice);
    let _ = write!(
        out,
        "|0.{:02}|0.{:02}|{}|{}|",
        r.discount, r.tax, r.returnflag as char, r.linestatus as char
    );
    for d in [r.shipdate, r.commitdate, r.receiptdate] {
        fmt_date(out, d);
        out.push('|');
    }
    let _ = writeln!(out, "{}|{}|{}|", r.shipinstruct, r.shipmode, r.comment);
}

/// The table file and its zone map.
pub fn files(rows: &[LineItem]) -> Vec<(String, Vec<u8>)> {
    let mut tbl = String::with_capacity(rows.len() * 140);
    let mut idx = String::new();
    let mut last_month = None;
    for (i, r) in rows.iter().enumerate() {
        let (y, m, _) = civil_from_days(r.shipdate);
        if last_month != Some((y, m)) {
            last_month = Some((y, m));
            idx.push_str(&format!("{y:04}-{m:02}|{}|{i}\n", tbl.len()));
        }
        format_row(&mut tbl, r);
    }
    alloc::vec![
        (LINEITEM_PATH.into(), tbl.into_bytes()),
        (LINEITEM_IDX_PATH.into(), idx.into_bytes())
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1998, 12, 1), 10_561);
        for d in [0, 8035, 10_561, -1, 12_345] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        let mut s = String::new();
        fmt_date(&mut s, days_from_civil(1994, 1, 1));
        assert_eq!(s, "1994-01-01");
        assert_eq!(parse_date("1994-01-01"), Some(days_from_civil(1994, 1, 1)));
        assert_eq!(parse_date("1994-13-01"), None);
    }

    #[test]
    fn table_follows_the_column_rules() {
        let opts = ImageOptions::tiny();
        let rows = generate(&opts);
        assert!(rows.len() as u64 >= opts.olap_rows && rows.len() as u64 <= opts.olap_rows + 7);
        assert!(rows.windows(2).all(|w| w[0].shipdate <= w[1].shipdate));
        for r in &rows {
            assert!((1..=50).contains(&r.quantity) && r.discount <= 10 && r.tax <= 8);
            assert_eq!(r.extendedprice, r.quantity as i64 * retail_price(r.partkey));
            assert_eq!(r.linestatus == b'F', r.shipdate <= current_date());
        }
        let f = files(&rows);
        let text = core::str::from_utf8(&f[0].1).unwrap();
        assert_eq!(text.lines().count(), rows.len());
        let first = text.lines().next().unwrap();
        assert_eq!(first.split('|').count(), 17, "{first}");
        let idx = core::str::from_utf8(&f[1].1).unwrap();
        for line in idx.lines() {
            let month = line.split('|').next().unwrap();
            let off: usize = line.split('|').nth(1).unwrap().parse().unwrap();
            assert!(off == 0 || text.as_bytes()[off - 1] == b'\n');
            let ship = text[off..].split('|').nth(10).unwrap();
            assert!(ship.starts_with(month), "{ship} vs {month}");
        }
    }
}
