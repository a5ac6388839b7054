//! Timestamps as stored: UTC text in one fixed-width format, so that SQL compares them as
//! text correctly and a person reads them as they are.

use chrono::{DateTime, NaiveDateTime, Utc};

use super::StoreError;

const FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";

pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.format(FORMAT).to_string()
}

pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, StoreError> {
    NaiveDateTime::parse_from_str(text, FORMAT)
        .map(|naive| naive.and_utc())
        .map_err(|err| StoreError::Corrupt(format!("timestamp {text:?}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts_as_text() {
        let earlier = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.5Z")
            .unwrap()
            .to_utc();
        let later = DateTime::parse_from_rfc3339("2026-01-02T03:04:06Z")
            .unwrap()
            .to_utc();
        assert_eq!(format_timestamp(earlier), "2026-01-02T03:04:05.500Z");
        assert_eq!(
            parse_timestamp(&format_timestamp(earlier)).unwrap(),
            earlier
        );
        assert!(format_timestamp(earlier) < format_timestamp(later));
    }
}
