//! The core's one error type. Each protocol maps it to its own statuses in one function
//! (each client reads codes differently).

use crate::store::{BodyError, StoreError, UploadMeta};

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request contradicts what the upload pinned when it started.
    #[error("the request disagrees with the upload's first request")]
    Conflict { pinned: Box<UploadMeta> },
    /// A part already stored with another length.
    #[error("part {number} is stored with {stored} bytes, this request declares {declared}")]
    PartLength {
        number: u64,
        stored: u64,
        declared: u64,
    },
    /// The body held fewer bytes than declared (`broke_off`: because it ended early).
    #[error("the request declares {declared} bytes but carries {received}")]
    Short {
        declared: u64,
        received: u64,
        broke_off: Option<BodyError>,
    },
    /// The body held more bytes than declared or allowed.
    #[error("the request carries more than the {limit} bytes it may")]
    TooLong { limit: u64 },
    /// No such upload (never created, or removed).
    #[error("no such upload")]
    NotFound,
    /// An append at another offset than the upload's.
    #[error("the upload is at offset {current}")]
    OffsetMismatch { current: u64 },
    /// The length was already declared, differently.
    #[error("the upload's length is {declared} already")]
    LengthDeclared { declared: u64 },
    /// An upload to be concatenated lacks bytes.
    #[error("the upload to concatenate is not complete")]
    Incomplete,
    /// The protocol's own check of the bytes (a checksum) refused them; nothing was kept.
    #[error("the bytes were refused")]
    Refused,
    #[error(transparent)]
    Store(#[from] StoreError),
}
