//! What the tus protocol answers, as statuses and headers: the one place where tus statuses
//! are chosen (tus 1.0.0; tus-js-client retries 5xx and 423/409 from some servers, and gives
//! up on other 4xx).

use super::checksum::ALGORITHMS;
use crate::http::Reply;
use crate::store::RecordedAnswer;
use crate::upload::{CoreError, Outcome};

pub(super) const VERSION: &str = "1.0.0";
pub(super) const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,expiration,checksum,checksum-trailer,\
    termination,concatenation";

/// Where a completed upload's delivery stands, as a request that waited for it saw it.
pub(super) enum Delivered {
    /// The upload is not complete.
    NotYet,
    /// The upstream's answer, final (2xx, or a refusal that a retry would not change).
    Answer(Box<RecordedAnswer>),
    /// Still under way after `forward.wait`.
    Pending,
    /// It came to no answer that stands (unreachable, 5xx, ...): the bytes are kept and the
    /// queue retries.
    Failed(Outcome),
}

/// What a tus request comes to, before it is a status.
pub(super) enum Answer {
    /// OPTIONS: what this server supports.
    Capabilities {
        max_size: u64,
    },
    /// POST: created at `location`; `offset` if the request carried bytes.
    Created {
        location: String,
        offset: Option<u64>,
        expires: Option<String>,
        /// Where the delivery stands, if the creation completed the upload.
        delivered: Delivered,
        /// `Upload-Concat` of a partial or final upload, echoed.
        concat: Option<String>,
    },
    /// HEAD: where the upload stands.
    Progress {
        offset: u64,
        length: Option<u64>,
        metadata: Option<String>,
        expires: Option<String>,
        /// `Upload-Concat` of a partial or final upload.
        concat: Option<String>,
    },
    /// PATCH stored its bytes; `delivered`: where the delivery stands if the upload is
    /// complete (the upstream's 2xx is relayed as headers, another answer as the answer).
    Patched {
        offset: u64,
        expires: Option<String>,
        delivered: Delivered,
    },
    /// DELETE.
    Terminated,
    /// GET: the upstream's recorded answer.
    Upstream(RecordedAnswer),
    /// GET before the delivery is done.
    Pending,
    /// A complete upload whose delivery came to no answer.
    Undelivered(Outcome),
    Refused(Refusal),
}

pub(super) enum Refusal {
    /// `Tus-Resumable` missing or another version.
    Version,
    /// The body stalled (its bytes so far are kept).
    Stalled,
    /// A newer request for the upload took over while this one's body was being read (its
    /// bytes so far are kept).
    TakenOver,
    /// A graceful shutdown stopped the PATCH; `offset` bytes are stored.
    ShuttingDown {
        offset: u64,
    },
    /// The request's tus headers are missing or malformed.
    BadRequest(String),
    /// Upload bytes (a PATCH's, or a creation's) not sent as `application/offset+octet-stream`.
    ContentType,
    /// No such upload.
    NotFound,
    /// A PATCH on a final upload (made of partial uploads).
    Final,
    /// A GET for the answer to a partial upload, which has none of its own.
    Partial,
    /// The authorization hook could not be asked (the reason is for the log).
    Unasked(String),
    /// The upload was there and is no more ("terminated" or "expired").
    Gone(String),
    /// The method does not apply to this URL; the ones that do (`Allow`).
    Method(&'static str),
    /// A finalize request for an upload that still lacks bytes.
    Incomplete {
        offset: u64,
        length: Option<u64>,
    },
    /// Over `Tus-Max-Size` or the route's limit.
    TooLarge(u64),
    /// `Upload-Checksum` names an algorithm this server does not have.
    UnknownAlgorithm(String),
    /// The checksum announced as a trailer could not be checked: the body is discarded.
    Trailer(String),
    Core(CoreError),
}

impl Refusal {
    /// True if the request's body was read and thrown away: a checksum that did not match,
    /// or one in a trailer that could not be checked.
    pub(super) fn discards_the_bytes(&self) -> bool {
        matches!(
            self,
            Refusal::Core(CoreError::Refused) | Refusal::Trailer(_)
        )
    }
}

/// The reply to a tus request.
pub(super) fn reply(answer: Answer) -> Reply {
    let reply = match answer {
        // 200 rather than 204: both are allowed, and some clients and test suites only
        // take 200.
        Answer::Capabilities { max_size } => Reply::empty(200)
            .with_header("tus-version", VERSION)
            .with_header("tus-extension", EXTENSIONS)
            .with_header("tus-max-size", &max_size.to_string())
            .with_header("tus-checksum-algorithm", ALGORITHMS),
        Answer::Created {
            location,
            offset,
            expires,
            delivered,
            concat,
        } => {
            let mut reply = Reply::empty(201).with_header("location", &location);
            if let Some(concat) = concat {
                reply = reply.with_header("upload-concat", &concat);
            }
            let reply = with_expires(reply, expires);
            let reply = match offset {
                Some(offset) => reply.with_header("upload-offset", &offset.to_string()),
                None => reply,
            };
            with_delivery(reply, delivered)
        }
        Answer::Progress {
            offset,
            length,
            metadata,
            expires,
            concat,
        } => {
            let mut reply = Reply::empty(200)
                .with_header("upload-offset", &offset.to_string())
                .with_header("cache-control", "no-store");
            reply = match length {
                Some(length) => reply.with_header("upload-length", &length.to_string()),
                None => reply.with_header("upload-defer-length", "1"),
            };
            if let Some(metadata) = metadata.filter(|m| !m.is_empty()) {
                reply = reply.with_header("upload-metadata", &metadata);
            }
            if let Some(concat) = concat {
                reply = reply.with_header("upload-concat", &concat);
            }
            with_expires(reply, expires)
        }
        Answer::Patched {
            offset,
            expires,
            delivered,
        } => patched(offset, expires, delivered),
        Answer::Terminated => Reply::empty(204),
        Answer::Upstream(answer) => Reply {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
        },
        Answer::Pending => Reply::text(202, "the upload is being delivered to the application")
            .with_header("stitch-delivery", "pending"),
        Answer::Undelivered(outcome) => undelivered(outcome),
        Answer::Refused(refusal) => refused(refusal),
    };
    reply.with_header("tus-resumable", VERSION)
}

fn with_expires(reply: Reply, expires: Option<String>) -> Reply {
    match expires {
        Some(expires) => reply.with_header("upload-expires", &expires),
        None => reply,
    }
}

/// A successful PATCH is 204 with the new offset. When it completed the upload, the
/// upstream's status rides along; an upstream that refused the file (not 2xx) is relayed as the
/// PATCH's answer, so that the client reports it.
fn patched(offset: u64, expires: Option<String>, delivered: Delivered) -> Reply {
    let reply = match &delivered {
        Delivered::Answer(answer) if !(200..300).contains(&answer.status) => Reply {
            status: answer.status,
            headers: answer.headers.clone(),
            body: answer.body.clone(),
        },
        _ => Reply::empty(204),
    };
    let reply = with_expires(reply, expires).with_header("upload-offset", &offset.to_string());
    with_delivery(reply, delivered)
}

/// Headers that say where a completed upload's delivery stands.
fn with_delivery(reply: Reply, delivered: Delivered) -> Reply {
    match delivered {
        Delivered::Answer(answer) => {
            let state = if (200..300).contains(&answer.status) {
                "delivered"
            } else {
                "refused"
            };
            reply
                .with_header("stitch-delivery", state)
                .with_header("stitch-upstream-status", &answer.status.to_string())
        }
        Delivered::Pending => reply.with_header("stitch-delivery", "pending"),
        // Queued: retried in the background until an answer stands.
        Delivered::Failed(outcome) => {
            let reply = reply.with_header("stitch-delivery", "retrying");
            match outcome {
                Outcome::Answered { answer, .. } => {
                    reply.with_header("stitch-upstream-status", &answer.status.to_string())
                }
                _ => reply,
            }
        }
        Delivered::NotYet => reply,
    }
}

fn undelivered(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Answered { answer, .. } => Reply {
            status: if answer.status >= 500 {
                502
            } else {
                answer.status
            },
            headers: answer.headers,
            body: answer.body,
        },
        Outcome::Unreachable => Reply::text(
            502,
            "the application could not be reached; the file is kept, retry",
        ),
        Outcome::TimedOut => Reply::text(
            504,
            "the application did not answer in time; the file is kept, retry",
        ),
        Outcome::StorageFailed => {
            Reply::text(503, "storage is unavailable; the file is kept, retry")
        }
        Outcome::Gone => Reply::text(
            410,
            "the upload is gone (terminated or expired before its delivery)",
        ),
    }
    .with_header("stitch-delivery", "failed")
}

fn refused(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::Version => {
            Reply::refuse(412, "this server speaks tus 1.0.0").with_header("tus-version", VERSION)
        }
        Refusal::Stalled => Reply::refuse(408, "the body stalled; the bytes that arrived are kept"),
        // 409, as for an offset that moved: tus-js-client retries it, asking HEAD where to go on.
        Refusal::TakenOver => Reply::refuse(
            409,
            "a newer request for this upload took over; the bytes that arrived are kept, \
             HEAD gives the offset",
        ),
        // 503, which tus clients retry (tus-js-client and Uppy after their first retry delay),
        // asking HEAD where to go on: the new process, or this one once it is back.
        Refusal::ShuttingDown { offset } => Reply::refuse(
            503,
            "the server is restarting; the bytes that arrived are kept, HEAD gives the offset",
        )
        .with_header("retry-after", "1")
        .with_header("upload-offset", &offset.to_string()),
        Refusal::BadRequest(reason) => Reply::refuse(400, reason),
        Refusal::ContentType => Reply::refuse(
            415,
            "an upload's bytes must be sent as Content-Type: application/offset+octet-stream",
        ),
        Refusal::NotFound => Reply::refuse(404, "no such upload"),
        Refusal::Final => Reply::refuse(403, "a final upload is made of its partial uploads"),
        Refusal::Unasked(why) => Reply::hook_unavailable(&why),
        Refusal::Partial => Reply::refuse(
            409,
            "a partial upload is delivered as part of a final upload: its answer is the final \
             upload's",
        ),
        Refusal::Gone(how) => Reply::refuse(410, format!("the upload is gone ({how})")),
        Refusal::Method(allow) => {
            Reply::refuse(405, "not a tus request for this URL").with_header("allow", allow)
        }
        Refusal::Incomplete { offset, length } => {
            let length = length.map_or_else(|| "an undeclared length".into(), |n| n.to_string());
            Reply::refuse(
                409,
                format!("the upload is not complete: {offset} of {length} bytes are stored"),
            )
        }
        Refusal::TooLarge(max) => Reply::refuse(
            413,
            format!("this server takes files of at most {max} bytes"),
        ),
        Refusal::UnknownAlgorithm(algorithm) => Reply::refuse(
            400,
            format!("checksum algorithm {algorithm:?} is not one of {ALGORITHMS}"),
        ),
        Refusal::Trailer(why) => Reply::refuse(400, why),
        Refusal::Core(e) => core_refusal(e),
    }
}

fn core_refusal(e: CoreError) -> Reply {
    match e {
        CoreError::NotFound => Reply::refuse(404, "no such upload"),
        CoreError::OffsetMismatch { current } => {
            Reply::refuse(409, format!("the upload is at offset {current}"))
                .with_header("upload-offset", &current.to_string())
        }
        CoreError::TooLong { limit } => {
            Reply::refuse(413, format!("the upload has room for {limit} more bytes"))
        }
        CoreError::LengthDeclared { declared } => {
            Reply::refuse(400, format!("the upload's length is {declared} already"))
        }
        CoreError::Refused => Reply::refuse(460, "the checksum does not match the body"),
        CoreError::Store(e) => {
            tracing::error!("storage failed: {e}");
            Reply::text(503, "storage is unavailable; retry later")
        }
        other => Reply::refuse(400, other.to_string()),
    }
}
