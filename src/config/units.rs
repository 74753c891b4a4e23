//! Human-friendly sizes (`64MiB`) and durations (`30s`) for the YAML config.
//!
//! Both accept a bare integer too (bytes, seconds), so `max_chunk_size: 1048576` works.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// A byte count written as `123`, `64KiB`, `8MiB`, `10GiB`, `2TiB` (or KB/MB/GB/TB, decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A duration written as `90` (seconds), `500ms`, `30s`, `15m`, `24h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = text[..digits].parse().ok()?;
    Some((number, text[digits..].trim()))
}

impl ByteSize {
    pub fn parse(text: &str) -> Option<ByteSize> {
        let (number, unit) = split_number(text)?;
        let factor: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return None,
        };
        number.checked_mul(factor).map(ByteSize)
    }
}

impl Span {
    pub fn parse(text: &str) -> Option<Span> {
        let (number, unit) = split_number(text)?;
        let duration = match unit {
            "ms" => Duration::from_millis(number),
            "" | "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            "d" => Duration::from_secs(number.checked_mul(86_400)?),
            _ => return None,
        };
        Some(Span(duration))
    }
}

/// One visitor for both types: an unsigned integer or a string with a unit. Values `accept`
/// refuses are errors raised inside the visitor, so that serde_yaml reports their line.
struct UnitVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Option<T>,
    from_int: fn(u64) -> T,
    accept: fn(&T) -> bool,
}

impl<T> Visitor<'_> for UnitVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Some((self.from_int)(v))
            .filter(self.accept)
            .ok_or_else(|| E::custom(format!("expected {}, found {v}", self.expecting)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("expected {}, found {v}", self.expecting))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v)
            .filter(self.accept)
            .ok_or_else(|| E::custom(format!("expected {}, found {v:?}", self.expecting)))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a size such as 1048576, 512KiB, 64MiB or 10GiB",
            parse: ByteSize::parse,
            from_int: ByteSize,
            accept: |_| true,
        })
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a duration such as 30, 500ms, 30s, 15m, 24h or 7d",
            parse: Span::parse,
            from_int: |secs| Span(Duration::from_secs(secs)),
            accept: |_| true,
        })
    }
}

/// For a duration that must be at least a second (`upload_ttl: 0` would expire every upload
/// at once): `#[serde(deserialize_with = "at_least_a_second")]`.
pub fn at_least_a_second<'de, D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
    d.deserialize_any(UnitVisitor {
        expecting: "a duration of at least 1s, such as 30s, 15m or 24h",
        parse: Span::parse,
        from_int: |secs| Span(Duration::from_secs(secs)),
        accept: |span| span.0 >= Duration::from_secs(1),
    })
}

/// For a duration that must not be zero (a timeout of 0 fails everything at once).
pub fn above_zero<'de, D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
    d.deserialize_any(UnitVisitor {
        expecting: "a duration above zero, such as 500ms, 30s or 5m",
        parse: Span::parse,
        from_int: |secs| Span(Duration::from_secs(secs)),
        accept: |span| !span.0.is_zero(),
    })
}

/// For `connections.max_header_size`: 1 KiB to just under 1 MiB, the most Pingora reads.
pub fn header_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    d.deserialize_any(UnitVisitor {
        expecting: "a size from 1KiB to 1023KiB",
        parse: ByteSize::parse,
        from_int: ByteSize,
        accept: |size| (1024..1 << 20).contains(&size.0),
    })
}

/// For a count that must be at least 1 (`threads: 0` cannot run).
pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_any(UnitVisitor {
        expecting: "a whole number of at least 1",
        parse: |_| None,
        from_int: |n| usize::try_from(n).unwrap_or(usize::MAX),
        accept: |n| *n >= 1,
    })
}

/// [`at_least_one`] for an optional key.
pub fn some_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    at_least_one(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("64MiB"), Some(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("3GB"), Some(ByteSize(3_000_000_000)));
        assert_eq!(ByteSize::parse("17"), Some(ByteSize(17)));
        assert_eq!(ByteSize::parse("5 parsecs"), None);
        assert_eq!(ByteSize::parse("99999999999TiB"), None);
    }

    #[test]
    fn durations_accept_common_units() {
        assert_eq!(Span::parse("24h"), Some(Span(Duration::from_secs(86_400))));
        assert_eq!(Span::parse("250ms"), Some(Span(Duration::from_millis(250))));
        assert_eq!(Span::parse("soon"), None);
    }
}
