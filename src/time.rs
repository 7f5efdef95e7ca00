//! Timestamps as RFC 3339 text, without a calendar dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Formats unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses a duration written as a number and a unit: `0s`, `90s`, `30m`, `12h`, `90d`,
/// `1y` (365 days), or `ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || {
        format!("invalid duration {s:?}: write a number and a unit, e.g. 500ms, 30s, 10m, 24h, 90d")
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "y" => 365 * 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

/// Reads a duration field of a config file.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::time::Duration, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(super::parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(super::parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(
            super::parse_duration("24h"),
            Ok(Duration::from_secs(86_400))
        );
        assert_eq!(
            super::parse_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        for bad in ["", "h", "10", "10x", "-1s", "1.5h", "99999999999999999999d"] {
            assert!(super::parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_000_000_123), "2026-11-18T11:06:40Z");
    }
}
