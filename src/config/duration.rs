//! Durations as operators write them: `250ms`, `30s`, `5m`, `1h`, `2d`.

use std::time::Duration;

/// Parses a whole number followed by a unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let expected = || format!("{text:?} is not a duration; write e.g. 500ms, 30s, 5m, 1h or 2d");
    let number: u64 = number.parse().map_err(|_| expected())?;
    let seconds = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(expected()),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn rejects_missing_unit_and_garbage() {
        for bad in ["30", "s", "1.5s", "-1s", "10 parsecs", ""] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
