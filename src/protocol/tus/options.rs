//! A tus route's own options (`tus:` in a route).

use serde::Deserialize;

/// The options, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TusOptions {
    /// The most bytes of `Upload-Metadata` a creation may carry.
    pub max_metadata: usize,
    /// The metadata key whose value names an upload in a finalize request
    /// (`PUT <route path>/<value>`); `None`: no finalize requests.
    pub finalize: Option<String>,
    /// The route is reached through another proxy: upload URLs are built from its
    /// `Forwarded` (or `X-Forwarded-Host` / `X-Forwarded-Proto`) headers.
    pub behind_proxy: bool,
}

/// `tus:` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTusOptions {
    max_metadata: Option<crate::config::ByteSize>,
    finalize: Option<String>,
    #[serde(default)]
    behind_proxy: bool,
}

impl TusOptions {
    pub fn new(raw: RawTusOptions) -> Result<TusOptions, String> {
        let max_metadata = raw.max_metadata.map_or(4 << 10, |size| size.0);
        if !(64..=(64 << 10)).contains(&max_metadata) {
            return Err("tus.max_metadata must be between 64B and 64KiB".into());
        }
        let finalize = match raw.finalize.as_deref() {
            None => Some("token".to_string()),
            Some("none") => None,
            Some(key)
                if !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic() && b != b',') =>
            {
                Some(key.to_string())
            }
            Some(key) => {
                return Err(format!(
                    "tus.finalize: {key:?} is not a metadata key (or `none`)"
                ))
            }
        };
        Ok(TusOptions {
            max_metadata: max_metadata as usize,
            finalize,
            behind_proxy: raw.behind_proxy,
        })
    }
}
