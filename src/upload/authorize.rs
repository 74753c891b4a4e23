//! The authorization hook: before a new upload stores its first byte, the upstream is asked
//! (a small JSON POST with the client's credentials) whether it may start. A 2xx lets it; a
//! refusal is relayed to the client and nothing is stored. Final answers are kept for a while
//! per upload, so a client's retries do not ask again; an upload that exists was allowed when
//! it started and is never asked about again.

use super::{Credentials, UploadCore};
use crate::config::Authorize;
use crate::forward::{verdict, DeliveryRequest, ForwardError, Verdict};
use crate::store::{RecordedAnswer, UploadKey};
use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a final answer of the hook is reused for the same upload.
const KEEP: Duration = Duration::from_secs(300);

/// The most memory the kept answers may take together (credentials and refusals, bodies
/// included). Whoever the hook refuses picks identifiers freely: each one would keep a
/// refusal page, and an HTML login page of 64 KiB sent a thousand times a second would hold
/// gigabytes for `KEEP`. Past this, an answer is not kept and the next request asks again.
const KEEP_BYTES: usize = 16 << 20;

/// The hook's final answers, by upload: when each came, for which credentials, and its size.
#[derive(Default)]
pub(super) struct Kept {
    answers: DashMap<UploadKey, (Instant, String, Authorization, usize)>,
    bytes: AtomicUsize,
    /// The questions being asked, by upload: requests for the same upload with the same
    /// credentials that come meanwhile (a client sends its first chunks in parallel) wait for
    /// that answer instead of asking again, a failure to ask included.
    asking: DashMap<UploadKey, Arc<Asking>>,
}

/// Removes a question from those under way (unless a newer one took its place) when dropped.
struct Asked<'a> {
    asking: &'a DashMap<UploadKey, Arc<Asking>>,
    upload: &'a UploadKey,
    mine: &'a Arc<Asking>,
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        self.asking
            .remove_if(self.upload, |_, current| Arc::ptr_eq(current, self.mine));
    }
}

/// A question to the hook under way, for these credentials.
struct Asking {
    credentials: String,
    answer: tokio::sync::OnceCell<Authorization>,
}

impl Kept {
    /// The answer kept for `upload` and these credentials, if it is recent.
    fn get(&self, upload: &UploadKey, credentials: &str) -> Option<Authorization> {
        let kept = self.answers.get(upload)?;
        let (at, who, authorization, _) = &*kept;
        (at.elapsed() < KEEP && who == credentials).then(|| authorization.clone())
    }

    /// Keeps an answer, unless the answers kept take `KEEP_BYTES` already (once the old ones
    /// are let go).
    fn keep(&self, upload: UploadKey, credentials: String, authorization: Authorization) {
        let size = 256
            + credentials.len()
            + match &authorization {
                Authorization::Refused(answer) => {
                    answer.body.len()
                        + answer
                            .headers
                            .iter()
                            .map(|(n, v)| n.len() + v.len())
                            .sum::<usize>()
                }
                _ => 0,
            };
        if self.bytes.load(Ordering::SeqCst) + size > KEEP_BYTES {
            self.forget_old();
            if self.bytes.load(Ordering::SeqCst) + size > KEEP_BYTES {
                return;
            }
        }
        self.bytes.fetch_add(size, Ordering::SeqCst);
        let entry = (Instant::now(), credentials, authorization, size);
        if let Some((_, _, _, replaced)) = self.answers.insert(upload, entry) {
            self.bytes.fetch_sub(replaced, Ordering::SeqCst);
        }
    }

    /// Lets the answers older than `KEEP` go.
    pub(super) fn forget_old(&self) {
        self.answers.retain(|_, (at, _, _, size)| {
            let keep = at.elapsed() < KEEP;
            if !keep {
                self.bytes.fetch_sub(*size, Ordering::SeqCst);
            }
            keep
        });
    }
}

/// What the hook said.
#[derive(Debug, Clone)]
pub enum Authorization {
    Allowed,
    /// Its answer, relayed to the client.
    Refused(Arc<RecordedAnswer>),
    /// It could not be asked, or asked for a retry (5xx, 408, 429): nothing is stored and the
    /// client is told to retry.
    Unavailable(String),
}

impl UploadCore {
    /// Asks the route's hook whether `upload` may start, describing it with `question`.
    pub async fn authorize(
        &self,
        upload: &UploadKey,
        hook: &Authorize,
        request: &DeliveryRequest,
        question: &serde_json::Value,
    ) -> Authorization {
        match self.engines.state.meta(upload).await {
            Ok(Some(_)) => return Authorization::Allowed,
            Ok(None) => {}
            Err(e) => return Authorization::Unavailable(format!("storage failed: {e}")),
        }
        // Kept per upload and credentials: after a refusal, a new login asks again.
        let credentials = Credentials::of(&request.headers).0;
        if let Some(kept) = self.authorizations.get(upload, &credentials) {
            return kept;
        }
        let asking = self
            .authorizations
            .asking
            .entry(*upload)
            .or_insert_with(|| {
                Arc::new(Asking {
                    credentials: credentials.clone(),
                    answer: Default::default(),
                })
            })
            .clone();
        if asking.credentials != credentials {
            // Someone else's question: not theirs to answer.
            return self.ask(upload, hook, request, question, credentials).await;
        }
        // Let go of once answered, or should this request be dropped while it asks.
        let _done = Asked {
            asking: &self.authorizations.asking,
            upload,
            mine: &asking,
        };
        asking
            .answer
            .get_or_init(|| self.ask(upload, hook, request, question, credentials))
            .await
            .clone()
    }

    /// Asks the hook, and keeps a final answer.
    async fn ask(
        &self,
        upload: &UploadKey,
        hook: &Authorize,
        request: &DeliveryRequest,
        question: &serde_json::Value,
        credentials: String,
    ) -> Authorization {
        let body = bytes::Bytes::from(serde_json::to_vec(question).expect("JSON values serialize"));
        let asked = self
            .forwarder
            .ask(upload, &hook.path, request, body, hook.timeout)
            .await;
        let answer = match asked {
            Ok(answer) => answer,
            Err(e) => {
                let why = match e {
                    ForwardError::Timeout { .. } => "it did not answer in time".to_string(),
                    other => other.to_string(),
                };
                tracing::warn!("{upload:?}: the authorization hook could not be asked: {why}");
                return Authorization::Unavailable(why);
            }
        };
        let status = answer.status;
        let authorization = if (200..300).contains(&status) {
            Authorization::Allowed
        } else if verdict(status) == Verdict::TryLater {
            tracing::warn!("{upload:?}: the authorization hook answered {status}");
            return Authorization::Unavailable(format!("it answered {status}"));
        } else {
            tracing::info!("{upload:?}: the authorization hook refused it ({status})");
            Authorization::Refused(Arc::new(answer))
        };
        self.authorizations
            .keep(*upload, credentials, authorization.clone());
        authorization
    }
}
