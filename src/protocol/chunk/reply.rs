//! What the chunk protocol answers, as statuses: the one place where Resumable.js and Flow.js
//! status codes are chosen. Both clients must read them the same way (README, "Status codes"):
//!
//! | situation | status |
//! |---|---|
//! | test: chunk stored and verified / not stored | 200 / 204, `Cache-Control: no-store` |
//! | chunk stored | 200 |
//! | the upload's answer (completing chunk, or a chunk matching the delivered file) | the upstream's, see [`relayed_status`] |
//! | invalid parameters, limits, disagreement with the first chunk | 415 (final for both clients) |
//! | body ended early or malformed multipart | 400 |
//! | body sent nothing for `connections.body_timeout` | 408 |
//! | storage failure | 503 |
//! | upstream unreachable / too slow at completion | 502 / 504 (parts kept) |

use super::params::ParamError;
use crate::http::Reply;
use crate::store::{BodyError, RecordedAnswer, UploadMeta};
use crate::upload::{CoreError, Outcome};

/// What a chunk request comes to, before it is a status.
pub(super) enum Answer {
    /// A test for a chunk that is not stored (or cannot be proved to be).
    NotStored,
    /// The chunk is stored (or was already).
    Stored,
    /// The application's answer to the upload, relayed or replayed.
    Upstream(Box<RecordedAnswer>),
    /// The delivery came to no answer.
    Undelivered(Outcome),
    Refused(Refusal),
}

/// Why a chunk request is refused.
pub(super) enum Refusal {
    Params(ParamError),
    /// The request body is larger than the route's largest chunk.
    BodyTooLarge,
    TooManyFields,
    FieldTooLong(String),
    FieldNotText(String),
    Multipart(String),
    /// The body sent nothing for the body timeout.
    Stalled,
    Expect(String),
    /// The authorization hook could not be asked (the reason is for the log).
    Unasked(String),
    /// The authorization hook refused the upload: its answer.
    Unauthorized(std::sync::Arc<RecordedAnswer>),
    /// The core refused it; `declared` is what the request said, for a conflict's message.
    Core(CoreError, Box<UploadMeta>),
}

/// How long a text field may be.
pub(super) const MAX_TEXT_FIELD: usize = 64 << 10;

/// The reply to a chunk request.
pub(super) fn reply(answer: Answer) -> Reply {
    match answer {
        Answer::NotStored => Reply::empty(204),
        Answer::Stored => Reply::text(200, "chunk stored"),
        Answer::Upstream(answer) => Reply {
            status: relayed_status(answer.status),
            headers: answer.headers,
            body: answer.body,
        },
        Answer::Undelivered(outcome) => undelivered(outcome),
        Answer::Refused(refusal) => refused(refusal),
    }
}

/// The upstream's status as the clients should see it. Resumable.js retries a 202 or 204 as if
/// it failed and Flow.js fails a 204, so a success is 200 (or 201); both give up for good on
/// 500 and 501, so an upstream failure that a retry can mend is 502.
fn relayed_status(status: u16) -> u16 {
    match status {
        200 | 201 => status,
        202..=299 => 200,
        500 | 501 => 502,
        other => other,
    }
}

fn undelivered(outcome: Outcome) -> Reply {
    match outcome {
        Outcome::Answered { answer, .. } => reply(Answer::Upstream(answer)),
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
        // (Final for both clients: a retry of this chunk alone would never complete a file.)
        Outcome::Gone => Reply::text(
            404,
            "the upload expired before its delivery; upload the file again",
        ),
    }
}

fn refused(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::Params(e) => Reply::refuse(415, e.0),
        // "Who are you" stays as it is (the clients retry, a new login may help); any other
        // refusal is final for both clients as 415, with the application's words.
        Refusal::Unauthorized(answer) => {
            let status = match crate::forward::verdict(answer.status) {
                crate::forward::Verdict::WhoAreYou => answer.status,
                _ => 415,
            };
            Reply {
                status,
                headers: answer.headers.clone(),
                body: answer.body.clone(),
            }
        }
        // Not a permanent error for either client: they retry.
        Refusal::Unasked(why) => Reply::hook_unavailable(&why),
        Refusal::BodyTooLarge => {
            Reply::refuse(415, "the request body is larger than this route accepts")
        }
        Refusal::TooManyFields => Reply::refuse(415, "too many or too long multipart fields"),
        Refusal::FieldTooLong(name) => Reply::refuse(
            415,
            format!("field {name:?} is longer than {MAX_TEXT_FIELD} bytes"),
        ),
        Refusal::FieldNotText(name) => {
            Reply::refuse(415, format!("field {name:?} is not UTF-8 text"))
        }
        Refusal::Multipart(e) => Reply::refuse(400, format!("malformed multipart body: {e}")),
        Refusal::Stalled => Reply::refuse(408, "the request body stalled; send the chunk again"),
        Refusal::Expect(e) => Reply::refuse(400, format!("could not answer Expect: {e}")),
        Refusal::Core(e, declared) => core_refusal(e, &declared),
    }
}

fn core_refusal(e: CoreError, declared: &UploadMeta) -> Reply {
    match e {
        CoreError::Conflict { pinned } => Reply::refuse(415, disagreement(&pinned, declared)),
        CoreError::PartLength { .. } | CoreError::TooLong { .. } => {
            Reply::refuse(415, e.to_string())
        }
        CoreError::Short {
            broke_off: Some(BodyError::Stalled),
            ..
        } => Reply::refuse(408, "the request body stalled; send the chunk again"),
        CoreError::Short {
            broke_off: Some(broke_off),
            ..
        } => Reply::refuse(400, broke_off.to_string()),
        CoreError::Short {
            broke_off: None, ..
        } => Reply::refuse(415, e.to_string()),
        CoreError::Store(e) => {
            tracing::error!("storage failed: {e}");
            Reply::text(503, "storage is unavailable; retry later")
        }
        // Not a chunk-protocol situation (tus notions): a plain refusal.
        e => Reply::refuse(415, e.to_string()),
    }
}

/// Which pinned value a request contradicts, in the client's terms.
fn disagreement(pinned: &UploadMeta, declared: &UploadMeta) -> String {
    let chunk_size = |meta: &UploadMeta| {
        let size = meta.protocol.get("chunk_size").and_then(|v| v.as_u64());
        size.unwrap_or_default().to_string()
    };
    let length = |meta: &UploadMeta| meta.length.unwrap_or_default().to_string();
    let name = |meta: &UploadMeta| format!("{:?}", meta.name);
    let media_type = |meta: &UploadMeta| format!("{:?}", meta.media_type.as_deref().unwrap_or(""));
    type Show<'a> = &'a dyn Fn(&UploadMeta) -> String;
    let checks: [(&str, Show); 4] = [
        ("chunk size", &chunk_size),
        ("total size", &length),
        ("file name", &name),
        ("file type", &media_type),
    ];
    let (what, was, now) = checks
        .iter()
        .map(|(what, show)| (*what, show(pinned), show(declared)))
        .find(|(_, was, now)| was != now)
        .unwrap_or(("file", String::new(), String::new()));
    format!("{what} {now} disagrees with {was} declared by the upload's first chunk")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_other_than_200_and_201_and_final_server_errors_are_translated() {
        assert_eq!(relayed_status(201), 201);
        assert_eq!(relayed_status(204), 200);
        assert_eq!(relayed_status(500), 502);
        assert_eq!(relayed_status(422), 422);
    }
}
