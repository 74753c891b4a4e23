//! A tus route's own options (`tus:` in a route).

use serde::Deserialize;

/// The options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TusOptions {
    /// The most bytes of `Upload-Metadata` a creation may carry.
    pub max_metadata: usize,
}

/// `tus:` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTusOptions {
    max_metadata: Option<crate::config::ByteSize>,
}

impl TusOptions {
    pub fn new(raw: RawTusOptions) -> Result<TusOptions, String> {
        let max_metadata = raw.max_metadata.map_or(4 << 10, |size| size.0);
        if !(64..=(64 << 10)).contains(&max_metadata) {
            return Err("tus.max_metadata must be between 64B and 64KiB".into());
        }
        Ok(TusOptions {
            max_metadata: max_metadata as usize,
        })
    }
}
