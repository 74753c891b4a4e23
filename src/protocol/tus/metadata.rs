//! `Upload-Metadata`: comma-separated `key base64value` pairs (the value may be left out).
//! Keys are unique, non-empty ASCII without spaces or commas; values are base64 (they may hold
//! any bytes; they reach the application as text, so they must be UTF-8).

use base64::Engine;

/// The pairs, in order, decoded.
pub fn parse(header: &str, max_bytes: usize) -> Result<Vec<(String, String)>, String> {
    if header.len() > max_bytes {
        return Err(format!("Upload-Metadata is over {max_bytes} bytes"));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    if header.trim().is_empty() {
        return Ok(pairs);
    }
    for pair in header.split(',') {
        let mut words = pair.trim().split(' ');
        let key = words.next().unwrap_or_default();
        let value = words.next();
        if words.next().is_some() {
            return Err(format!(
                "Upload-Metadata pair {pair:?} has more than a key and a value"
            ));
        }
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("Upload-Metadata has an empty or invalid key".into());
        }
        if pairs.iter().any(|(k, _)| k == key) {
            return Err(format!("Upload-Metadata repeats the key {key:?}"));
        }
        let value = match value {
            None | Some("") => String::new(),
            Some(encoded) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| format!("Upload-Metadata value of {key:?} is not base64"))?;
                String::from_utf8(bytes)
                    .map_err(|_| format!("Upload-Metadata value of {key:?} is not UTF-8 text"))?
            }
        };
        pairs.push((key.to_string(), value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_decoded_in_order_and_a_value_may_be_left_out() {
        let pairs = parse(
            "filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential",
            4096,
        )
        .unwrap();
        assert_eq!(
            pairs,
            vec![
                ("filename".into(), "world_domination_plan.pdf".into()),
                ("is_confidential".into(), String::new())
            ]
        );
    }

    #[test]
    fn malformed_metadata_is_refused() {
        assert!(parse("name !!!", 4096).is_err(), "not base64");
        assert!(parse("name YQ==,name Yg==", 4096).is_err(), "duplicate key");
        assert!(parse("a YQ==,,b Yg==", 4096).is_err(), "empty key");
        assert!(parse("a YQ== b", 4096).is_err(), "three words");
        assert!(
            parse(&format!("a {}", "Y".repeat(5000)), 4096).is_err(),
            "too long"
        );
        assert!(parse("a /w==", 4096).is_err(), "not UTF-8");
    }
}
