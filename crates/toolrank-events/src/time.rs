//! Calendar days and `TransactDT` timestamps, without a time-zone library.
//!
//! The seed stores `TransactDT` as `YYYYMMDDHHMMSS` text and takes its first eight
//! characters as the execution date with no time-zone shift, so plain civil-calendar
//! arithmetic is both exact and the fastest option.

use std::fmt;

/// A calendar day, counted from 1970-01-01 (day 0). Ordering is chronological.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Day(pub i32);

impl Day {
    /// The day of a valid proleptic-Gregorian date, or `None`.
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Day> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        // Howard Hinnant's days_from_civil.
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = month as i32;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i32 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(Day(era * 146_097 + doe - 719_468))
    }

    /// Year, month and day of this day.
    pub fn ymd(self) -> (i32, u32, u32) {
        let z = self.0 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i32::from(m <= 2);
        (y, m, d)
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse_iso(text: &str) -> Option<Day> {
        let b = text.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        Day::from_ymd(digits(&b[0..4])? as i32, digits(&b[5..7])?, digits(&b[8..10])?)
    }

    /// Today's date in UTC.
    pub fn today_utc() -> Day {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Day((secs / 86_400) as i32)
    }
}

impl Day {
    /// `YYYY-MM-DD` into a stack buffer: writers of millions of rows avoid `fmt`.
    pub fn iso_bytes(self) -> [u8; 10] {
        let (y, m, d) = self.ymd();
        let mut b = *b"0000-00-00";
        put_digits(&mut b[0..4], y.clamp(0, 9999) as u32);
        put_digits(&mut b[5..7], m);
        put_digits(&mut b[8..10], d);
        b
    }
}

fn put_digits(out: &mut [u8], mut v: u32) {
    for c in out.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0')))
}

/// A validated `TransactDT`: the instant as the number `YYYYMMDDHHMMSS` (whose order is
/// chronological) and its calendar day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Timestamp {
    /// `YYYYMMDDHHMMSS` as an integer.
    pub packed: u64,
    /// The execution date.
    pub day: Day,
}

impl Timestamp {
    /// Parses the seed's `YYYYMMDDHHMMSS`; also accepts `YYYY-MM-DD[T ]HH:MM:SS` with an
    /// optional fraction and `Z`, as flat events written by hand often carry. The time-zone
    /// designator is not applied: the seed takes dates without any shift.
    pub fn parse(text: &str) -> Option<Timestamp> {
        let b = text.as_bytes();
        let compact: [u8; 14] = if b.len() == 14 {
            b.try_into().ok()?
        } else if b.len() >= 19
            && b[4] == b'-'
            && b[7] == b'-'
            && (b[10] == b'T' || b[10] == b' ')
            && b[13] == b':'
            && b[16] == b':'
            && valid_iso_tail(&b[19..])
        {
            let mut c = [0u8; 14];
            c[0..4].copy_from_slice(&b[0..4]);
            c[4..6].copy_from_slice(&b[5..7]);
            c[6..8].copy_from_slice(&b[8..10]);
            c[8..10].copy_from_slice(&b[11..13]);
            c[10..12].copy_from_slice(&b[14..16]);
            c[12..14].copy_from_slice(&b[17..19]);
            c
        } else {
            return None;
        };
        let day = Day::from_ymd(digits(&compact[0..4])? as i32, digits(&compact[4..6])?, digits(&compact[6..8])?)?;
        let (h, m, s) = (digits(&compact[8..10])?, digits(&compact[10..12])?, digits(&compact[12..14])?);
        if h > 23 || m > 59 || s > 59 {
            return None;
        }
        let packed = compact.iter().fold(0u64, |acc, &c| acc * 10 + u64::from(c - b'0'));
        Some(Timestamp { packed, day })
    }

    /// The timestamp of a [`packed`](Self::packed) number, if it is a valid one.
    pub fn from_packed(packed: u64) -> Option<Timestamp> {
        let (date, time) = (packed / 1_000_000, packed % 1_000_000);
        let day = Day::from_ymd(i32::try_from(date / 10_000).ok()?, (date / 100 % 100) as u32, (date % 100) as u32)?;
        (time / 10_000 <= 23 && time / 100 % 100 <= 59 && time % 100 <= 59).then_some(Timestamp { packed, day })
    }

    /// `YYYY-MM-DD HH:MM:SS` into a stack buffer.
    pub fn datetime_bytes(self) -> [u8; 19] {
        let mut b = *b"0000-00-00 00:00:00";
        b[..10].copy_from_slice(&self.day.iso_bytes());
        let p = self.packed;
        put_digits(&mut b[11..13], (p / 10_000 % 100) as u32);
        put_digits(&mut b[14..16], (p / 100 % 100) as u32);
        put_digits(&mut b[17..19], (p % 100) as u32);
        b
    }

    /// `YYYY-MM-DD HH:MM:SS`.
    pub fn to_datetime_string(self) -> String {
        String::from_utf8_lossy(&self.datetime_bytes()).into_owned()
    }
}

fn valid_iso_tail(rest: &[u8]) -> bool {
    let rest = rest.strip_suffix(b"Z").unwrap_or(rest);
    match rest.split_first() {
        None => true,
        Some((b'.', frac)) => !frac.is_empty() && frac.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_across_centuries() {
        for d in -800_000..800_000 {
            let (y, m, dd) = Day(d).ymd();
            assert_eq!(Day::from_ymd(y, m, dd), Some(Day(d)));
        }
        assert_eq!(Day::from_ymd(1970, 1, 1), Some(Day(0)));
        assert_eq!(Day::parse_iso("2025-07-14").unwrap().0 - Day::parse_iso("2025-06-14").unwrap().0, 30);
    }

    #[test]
    fn timestamps_validate_every_field() {
        let t = Timestamp::parse("20250614140605").unwrap();
        assert_eq!(Timestamp::from_packed(t.packed), Some(t));
        assert_eq!(Timestamp::from_packed(20250631140605), None, "no June 31st");
        assert_eq!(Timestamp::from_packed(20250614146005), None, "no minute 60");
        assert_eq!(t.day.to_string(), "2025-06-14");
        assert_eq!(t.to_datetime_string(), "2025-06-14 14:06:05");
        assert_eq!(&Day::parse_iso("0987-01-02").unwrap().iso_bytes(), b"0987-01-02");
        assert_eq!(Timestamp::parse("2025-06-14T14:06:05Z"), Some(t));
        assert_eq!(Timestamp::parse("2025-06-14 14:06:05.123"), Some(t));
        for bad in [
            "2025061414060",
            "20251314140605",
            "20250230140605",
            "20250614240605",
            "20250614146005",
            "2025061414060x",
            "",
            "2025-06-14T14:06:05+09:00",
            "+0250614140605",
        ] {
            assert_eq!(Timestamp::parse(bad), None, "{bad}");
        }
        assert!(Timestamp::parse("20240229000000").is_some());
        assert!(Timestamp::parse("20230229000000").is_none());
    }
}
