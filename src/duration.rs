//! Go-style durations ("10s", "2m", "1m30s", "250ms"), as CAPI sends in `?timeout=` and as
//! operators write `syncInterval`.

use std::time::Duration;

/// Parses a Go duration string. Negative durations are refused; "0" is zero.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(format!("{text:?}: negative duration"));
    }
    let mut total_nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: missing unit"))?;
        if num_len == 0 {
            return Err(format!("{text:?}: expected a number"));
        }
        let (number, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
        };
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(format!("{text:?}: expected a number"));
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| format!("{text:?}: number too large"))?
        };
        let mut nanos = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| format!("{text:?}: duration too large"))?;
        let mut scale = unit_nanos;
        for digit in frac_part.chars() {
            let d = digit
                .to_digit(10)
                .ok_or_else(|| format!("{text:?}: bad number"))?;
            scale /= 10;
            nanos += u128::from(d) * scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| format!("{text:?}: duration too large"))?;
        rest = tail;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000)
        .map_err(|_| format!("{text:?}: duration too large"))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_go_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_go_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
    }

    #[test]
    fn refuses_bad_durations() {
        for bad in [
            "",
            "10",
            "s",
            "-5s",
            "5x",
            "1..2s",
            "99999999999999999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
