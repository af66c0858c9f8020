//! Value parsers shared by the commands' flags: numbers a `Duration` or a rate can hold,
//! so a bad flag is a usage error, never a panic.

/// The longest a seconds flag may be: a `Duration` cannot hold every `f64`, and nothing
/// here waits longer than a year.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A number of seconds: finite, 0 or more, at most a year.
pub fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=MAX_SECONDS).contains(&x) => Ok(x),
        _ => Err(format!("expected a number of seconds from 0 to {MAX_SECONDS}, not {s:?}")),
    }
}

/// Records per second: 0 (no limit) or at least one per hour.
pub fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x == 0.0 || (x.is_finite() && x >= 1.0 / 3600.0) => Ok(x),
        _ => Err(format!("expected 0 (no limit) or a rate of at least 1 per hour (0.000278), not {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_refuse_what_a_duration_cannot_hold() {
        assert_eq!(seconds("2.5"), Ok(2.5));
        assert_eq!(seconds("0"), Ok(0.0));
        for bad in ["-1", "nan", "inf", "1e300", "five", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_are_zero_or_a_pace_a_duration_can_hold() {
        assert_eq!(rate("0"), Ok(0.0));
        assert_eq!(rate("5000"), Ok(5000.0));
        for bad in ["-3", "nan", "inf", "1e-300", "x"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }
}
