//! Filters for template authors. Payload times reach templates as RFC 3339 UTC strings; these
//! turn them into what a reader sees. Every email shows times in UTC and says so.

use chrono::{DateTime, Datelike, Duration, SecondsFormat, Timelike, Utc};
use minijinja::{Error, ErrorKind};

fn parse(value: &str) -> Result<DateTime<Utc>, Error> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.to_utc())
        .map_err(|err| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("{value:?} is not an RFC 3339 time: {err}"),
            )
        })
}

/// `{{ event_at | utc }}` → `2020-05-22 04:39:00 UTC`.
///
/// Written field by field rather than with a `strftime` pattern, which chrono parses again on
/// every call: a tenth of a message's rendering time went to that.
pub fn utc(value: &str) -> Result<String, Error> {
    let time = parse(value)?;
    // chrono keeps a leap second as second 59 plus a second's worth of nanoseconds.
    let second = time.second() + u32::from(time.nanosecond() >= 1_000_000_000);
    Ok(format!(
        "{} {:02}:{:02}:{second:02} UTC",
        calendar_date(&time),
        time.hour(),
        time.minute(),
    ))
}

/// `{{ ordered_at | date }}` → `2020-05-20` (the UTC calendar date).
pub fn date(value: &str) -> Result<String, Error> {
    Ok(calendar_date(&parse(value)?))
}

/// `YYYY-MM-DD`. RFC 3339 years have four digits, so no sign or fifth digit is needed.
fn calendar_date(time: &DateTime<Utc>) -> String {
    format!("{:04}-{:02}-{:02}", time.year(), time.month(), time.day())
}

/// `{{ ordered_at | add_days(60) }}` → the RFC 3339 time that many days later.
pub fn add_days(value: &str, days: i64) -> Result<String, Error> {
    let shifted = Duration::try_days(days)
        .and_then(|days| parse(value).ok()?.checked_add_signed(days))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot add {days} days to {value:?}"),
            )
        })?;
    Ok(shifted.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// `{{ reference | path_segment }}`: percent-encodes everything but the URL's unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`), so a value stays one path segment: `/`, `?` and `#`
/// included. (minijinja's `urlencode` leaves `/` alone.)
pub fn path_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_in_utc() {
        assert_eq!(
            utc("2020-05-22T14:39:00+10:00").unwrap(),
            "2020-05-22 04:39:00 UTC"
        );
        assert_eq!(date("2020-05-22T23:30:00-02:00").unwrap(), "2020-05-23");
        assert_eq!(
            add_days("2020-05-20T09:15:00Z", 60).unwrap(),
            "2020-07-19T09:15:00Z"
        );
        assert!(utc("yesterday").is_err());
        assert!(add_days("2020-05-20T09:15:00Z", i64::MAX).is_err());
    }

    #[test]
    fn writes_what_the_strftime_patterns_wrote() {
        for value in [
            "0001-01-01T00:00:00Z",
            "1999-12-31T23:59:59-00:30",
            "2016-12-31T23:59:60Z",
            "2024-02-29T07:05:09.123456+05:45",
            "9999-12-31T23:59:59Z",
        ] {
            let time = parse(value).unwrap();
            assert_eq!(
                utc(value).unwrap(),
                time.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            );
            assert_eq!(date(value).unwrap(), time.format("%Y-%m-%d").to_string());
        }
    }

    #[test]
    fn a_path_segment_cannot_leave_its_segment() {
        assert_eq!(path_segment("5f3a9c1e"), "5f3a9c1e");
        assert_eq!(path_segment("../../x?y=1#z"), "..%2F..%2Fx%3Fy%3D1%23z");
        assert_eq!(path_segment("VXC 2020/é"), "VXC%202020%2F%C3%A9");
    }
}
