//! The authorization hook: before a new upload stores its first byte, the upstream is asked
//! (a small JSON POST with the client's credentials) whether it may start. A 2xx lets it; a
//! refusal is relayed to the client and nothing is stored. Final answers are kept for a while
//! per upload, so a client's retries do not ask again; an upload that exists was allowed when
//! it started and is never asked about again.

use super::{Credentials, UploadCore};
use crate::config::Authorize;
use crate::forward::{verdict, DeliveryRequest, ForwardError, Verdict};
use crate::store::{RecordedAnswer, UploadKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a final answer of the hook is reused for the same upload.
pub(super) const KEEP: Duration = Duration::from_secs(300);

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
        if let Some(kept) = self.authorizations.get(upload) {
            let (at, who, verdict) = &*kept;
            if at.elapsed() < KEEP && *who == credentials {
                return verdict.clone();
            }
        }
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
        self.authorizations.insert(
            *upload,
            (Instant::now(), credentials, authorization.clone()),
        );
        authorization
    }
}
