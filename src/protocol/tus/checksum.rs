//! The checksum extension: `Upload-Checksum: <algorithm> <base64 digest>` over one request's
//! body, checked before its bytes are kept. The body is hashed as it streams past.

use crate::store::{BodyError, BodySource};
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use sha1::Digest as _;
use std::sync::{Arc, Mutex};

/// The algorithms announced in `Tus-Checksum-Algorithm`.
pub const ALGORITHMS: &str = "sha1,sha256,md5,crc32";

/// A running hash of one of the announced algorithms.
enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Md5(md5::Md5),
    Crc32(crc32fast::Hasher),
}

impl Hasher {
    fn new(algorithm: &str) -> Option<Hasher> {
        Some(match algorithm {
            "sha1" => Hasher::Sha1(sha1::Sha1::new()),
            "sha256" => Hasher::Sha256(sha2::Sha256::new()),
            "md5" => Hasher::Md5(md5::Md5::new()),
            "crc32" => Hasher::Crc32(crc32fast::Hasher::new()),
            _ => return None,
        })
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Crc32(h) => h.update(bytes),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
        }
    }
}

/// What an `Upload-Checksum` header asks for.
pub struct Expected {
    algorithm: String,
    digest: Vec<u8>,
}

/// Why an `Upload-Checksum` header cannot be used.
#[derive(Debug)]
pub enum ChecksumError {
    /// An algorithm not announced (400).
    Unsupported(String),
    /// Not `<algorithm> <base64>` (400).
    Malformed,
}

impl Expected {
    pub fn parse(header: &str) -> Result<Expected, ChecksumError> {
        let (algorithm, encoded) = header
            .trim()
            .split_once(' ')
            .ok_or(ChecksumError::Malformed)?;
        if Hasher::new(algorithm).is_none() {
            return Err(ChecksumError::Unsupported(algorithm.to_string()));
        }
        let digest = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| ChecksumError::Malformed)?;
        Ok(Expected {
            algorithm: algorithm.to_string(),
            digest,
        })
    }
}

/// A body that hashes what passes through it; `matches` tells, at the end, whether the hash
/// is the expected one.
pub struct Checked<'b> {
    inner: &'b mut dyn BodySource,
    hasher: Arc<Mutex<Option<Hasher>>>,
}

/// Tells whether the bytes that passed through a [`Checked`] body have the expected digest.
#[derive(Clone)]
pub struct Verdict {
    hasher: Arc<Mutex<Option<Hasher>>>,
    expected: Option<Arc<Expected>>,
}

impl Verdict {
    /// True without a checksum to check.
    pub fn matches(&self) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let hasher = self.hasher.lock().expect("hasher").take();
        hasher.is_some_and(|h| h.finish() == expected.digest)
    }
}

/// Wraps `body` to check it against `expected` (if any).
pub fn check<'b>(
    body: &'b mut dyn BodySource,
    expected: Option<Expected>,
) -> (Checked<'b>, Verdict) {
    let hasher = Arc::new(Mutex::new(
        expected.as_ref().and_then(|e| Hasher::new(&e.algorithm)),
    ));
    let verdict = Verdict {
        hasher: hasher.clone(),
        expected: expected.map(Arc::new),
    };
    (
        Checked {
            inner: body,
            hasher,
        },
        verdict,
    )
}

#[async_trait]
impl BodySource for Checked<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        let piece = self.inner.next_piece().await?;
        if let (Some(piece), Some(hasher)) = (&piece, self.hasher.lock().expect("hasher").as_mut())
        {
            hasher.update(piece);
        }
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pieces(Vec<&'static [u8]>);

    #[async_trait]
    impl BodySource for Pieces {
        async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
            Ok((!self.0.is_empty()).then(|| Bytes::from_static(self.0.remove(0))))
        }
    }

    async fn verdict(header: &str) -> bool {
        let mut body = Pieces(vec![b"hello ", b"world"]);
        let (mut checked, verdict) = check(&mut body, Some(Expected::parse(header).unwrap()));
        while checked.next_piece().await.unwrap().is_some() {}
        verdict.matches()
    }

    #[tokio::test]
    async fn each_announced_algorithm_checks_the_body() {
        assert!(verdict("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=").await);
        assert!(verdict("sha256 uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=").await);
        assert!(verdict("md5 XrY7u+Ae7tCTyyK7j1rNww==").await);
        assert!(verdict("crc32 DUoRhQ==").await);
        assert!(!verdict("sha1 AAAAAAAAAAAAAAAAAAAAAAAAAAA=").await);
    }

    #[test]
    fn unknown_algorithms_and_bad_encodings_are_told_apart() {
        assert!(matches!(
            Expected::parse("whirlpool AAAA"),
            Err(ChecksumError::Unsupported(_))
        ));
        assert!(matches!(
            Expected::parse("sha1 !!!"),
            Err(ChecksumError::Malformed)
        ));
        assert!(matches!(
            Expected::parse("sha1"),
            Err(ChecksumError::Malformed)
        ));
    }
}
