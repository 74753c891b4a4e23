//! The checksum extension: `Upload-Checksum: <algorithm> <base64 digest>` over one request's
//! body, checked before its bytes are kept. The body is hashed as it streams past. With
//! checksum-trailer, the same field comes as a trailer, after the body.

use crate::proxy::trailers::TrailerError;
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

    fn name(&self) -> &'static str {
        match self {
            Hasher::Sha1(_) => "sha1",
            Hasher::Sha256(_) => "sha256",
            Hasher::Md5(_) => "md5",
            Hasher::Crc32(_) => "crc32",
        }
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

/// The trailer fields of a request whose body has ended (see `proxy::trailers`), put there
/// by whoever reads the body.
pub type TrailerSlot = Arc<Mutex<Option<Result<Vec<(String, String)>, TrailerError>>>>;

/// Where a request's checksum is.
pub enum Wanted {
    /// In the `Upload-Checksum` header.
    Header(Expected),
    /// In an `Upload-Checksum` trailer (checksum-trailer), read into the slot once the body
    /// has ended. The algorithm is not known while the body streams past, so it is hashed
    /// with every announced one.
    Trailer(TrailerSlot),
}

/// Why a trailer's checksum could not be checked; the body is discarded as on a mismatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailerProblem {
    /// Announced, but not among the trailers.
    Missing,
    /// Sent more than once.
    Repeated,
    /// The trailers could not be read.
    Unreadable(TrailerError),
    Checksum(String),
}

impl TrailerProblem {
    /// What the client is told (400).
    pub fn explain(&self) -> String {
        match self {
            TrailerProblem::Missing => {
                "Upload-Checksum was announced as a trailer but did not come".into()
            }
            TrailerProblem::Repeated => "Upload-Checksum came more than once".into(),
            TrailerProblem::Unreadable(TrailerError::Malformed) => {
                "the request's trailer section is malformed".into()
            }
            TrailerProblem::Unreadable(_) => "the request's trailers could not be read".into(),
            TrailerProblem::Checksum(why) => format!("the Upload-Checksum trailer: {why}"),
        }
    }
}

/// A body that hashes what passes through it; its [`Verdict`] tells, at the end, whether the
/// hash is the expected one.
pub struct Checked<'b> {
    inner: &'b mut dyn BodySource,
    state: Arc<Mutex<State>>,
}

struct State {
    hashers: Vec<Hasher>,
    /// Known once the body has been read and checked.
    outcome: Option<Result<bool, TrailerProblem>>,
}

/// Tells whether the bytes that passed through a [`Checked`] body have the expected digest.
#[derive(Clone)]
pub struct Verdict {
    state: Arc<Mutex<State>>,
    wanted: Option<Arc<Wanted>>,
}

impl Verdict {
    /// True without a checksum to check, or if it matches.
    pub fn matches(&self) -> bool {
        self.outcome() == Ok(true)
    }

    /// Whether the checksum matches; why it could not be checked. Settled at the first call,
    /// which must come after the body has ended.
    pub fn outcome(&self) -> Result<bool, TrailerProblem> {
        let mut state = self.state.lock().expect("checksum");
        if let Some(outcome) = &state.outcome {
            return outcome.clone();
        }
        let hashers = std::mem::take(&mut state.hashers);
        let outcome = match self.wanted.as_deref() {
            None => Ok(true),
            Some(Wanted::Header(expected)) => Ok(digest_of(hashers, &expected.algorithm)
                .is_some_and(|digest| digest == expected.digest)),
            Some(Wanted::Trailer(slot)) => from_trailer(slot).map(|expected| {
                digest_of(hashers, &expected.algorithm)
                    .is_some_and(|digest| digest == expected.digest)
            }),
        };
        state.outcome = Some(outcome.clone());
        outcome
    }
}

/// The digest the hasher for `algorithm` reached.
fn digest_of(hashers: Vec<Hasher>, algorithm: &str) -> Option<Vec<u8>> {
    hashers
        .into_iter()
        .find(|h| h.name() == algorithm)
        .map(Hasher::finish)
}

/// The `Upload-Checksum` among a body's trailers.
fn from_trailer(slot: &TrailerSlot) -> Result<Expected, TrailerProblem> {
    let fields = match slot.lock().expect("trailers").take() {
        None => return Err(TrailerProblem::Unreadable(TrailerError::NotKept)),
        Some(read) => read.map_err(TrailerProblem::Unreadable)?,
    };
    let mut values = fields
        .iter()
        .filter(|(name, _)| name == "upload-checksum")
        .map(|(_, value)| value);
    let value = values.next().ok_or(TrailerProblem::Missing)?;
    if values.next().is_some() {
        return Err(TrailerProblem::Repeated);
    }
    Expected::parse(value).map_err(|e| {
        TrailerProblem::Checksum(match e {
            ChecksumError::Unsupported(algorithm) => {
                format!("algorithm {algorithm:?} is not one of {ALGORITHMS}")
            }
            ChecksumError::Malformed => "it is `<algorithm> <base64 digest>`".into(),
        })
    })
}

/// Wraps `body` to check it as `wanted` says (if at all).
pub fn check<'b>(body: &'b mut dyn BodySource, wanted: Option<Wanted>) -> (Checked<'b>, Verdict) {
    let hashers = match &wanted {
        None => Vec::new(),
        Some(Wanted::Header(expected)) => Hasher::new(&expected.algorithm).into_iter().collect(),
        Some(Wanted::Trailer(_)) => ALGORITHMS.split(',').filter_map(Hasher::new).collect(),
    };
    let state = Arc::new(Mutex::new(State {
        hashers,
        outcome: None,
    }));
    let verdict = Verdict {
        state: state.clone(),
        wanted: wanted.map(Arc::new),
    };
    (Checked { inner: body, state }, verdict)
}

#[async_trait]
impl BodySource for Checked<'_> {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        let piece = self.inner.next_piece().await?;
        if let Some(piece) = &piece {
            for hasher in self.state.lock().expect("checksum").hashers.iter_mut() {
                hasher.update(piece);
            }
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
        let wanted = Wanted::Header(Expected::parse(header).unwrap());
        let (mut checked, verdict) = check(&mut body, Some(wanted));
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
