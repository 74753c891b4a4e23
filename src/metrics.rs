//! Prometheus metrics, one registry per server (tests run several in one process). Names follow
//! Prometheus conventions (`stitch_` prefix, base units, `_total`); labels are bounded: a
//! route's configured path, a protocol, a request kind, a status class, an outcome. Never an
//! identifier, a file name or a client address.

use crate::config::MetricsConfig;
use crate::http::app_response as reply;
use crate::upload::UploadCore;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct Metrics {
    registry: Registry,
    /// Requests on upload routes and passed through, by route, protocol, kind, status class.
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Bytes of chunk and PATCH bodies stored.
    pub received_bytes: IntCounterVec,
    /// Parts stored, and those whose bytes were stored already (deduplicated).
    pub parts_stored: IntCounter,
    pub parts_deduplicated: IntCounter,
    pub deduplicated_bytes: IntCounter,
    /// Upload events: started, completed, delivered, refused, expired, terminated.
    pub uploads: IntCounterVec,
    /// Delivery attempts by outcome, their duration, and the upstream's statuses by class.
    pub deliveries: IntCounterVec,
    /// Early deliveries (`forward.early`), by how they ended.
    pub early: IntCounterVec,
    pub delivery_seconds: Histogram,
    pub upstream_responses: IntCounterVec,
    /// Deliveries owed (the durable queue), as of the queue's last look or the last scrape.
    pub queue_length: IntGauge,
    /// Uploads in store not delivered yet, and the bytes the store holds (set at each scrape).
    pub in_progress: IntGauge,
    pub stored_bytes: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let requests = counter_vec(
            "stitch_requests_total",
            "Requests, by route, protocol, kind and status class.",
            &["route", "protocol", "kind", "status"],
        );
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stitch_request_duration_seconds",
                "Time from a request's arrival to the end of its answer.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["route", "protocol", "kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("registered once");
        let received_bytes = counter_vec(
            "stitch_received_bytes_total",
            "Bytes of upload bodies (chunks, PATCHes) received on upload routes.",
            &["route", "protocol"],
        );
        let parts_stored = counter(
            "stitch_parts_stored_total",
            "Parts (chunks, PATCH bodies) added to uploads.",
        );
        let parts_deduplicated = counter(
            "stitch_parts_deduplicated_total",
            "Parts whose bytes were stored already, so nothing new was written.",
        );
        let deduplicated_bytes = counter(
            "stitch_deduplicated_bytes_total",
            "Bytes not stored again thanks to deduplication.",
        );
        let uploads = counter_vec(
            "stitch_uploads_total",
            "Upload events: started, completed, delivered, refused, expired, terminated.",
            &["event"],
        );
        let deliveries = counter_vec(
            "stitch_delivery_attempts_total",
            "Attempts to deliver a finished file, by outcome.",
            &["outcome"],
        );
        let early = counter_vec(
            "stitch_early_deliveries_total",
            "Deliveries begun while their upload arrived, by how the stream ended: used (the \
             delivery finished it), stalled (a part did not come in time), unused (no delivery \
             came to finish it), failed.",
            &["outcome"],
        );
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "stitch_delivery_duration_seconds",
                "Time to send a finished file to the upstream and read its answer.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(delivery_seconds.clone()))
            .expect("registered once");
        let upstream_responses = counter_vec(
            "stitch_upstream_responses_total",
            "The upstream's answers to deliveries, by status class.",
            &["status"],
        );
        let queue_length = IntGauge::new(
            "stitch_delivery_queue_length",
            "Deliveries owed to the upstream (complete files without an answer that stands).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_length.clone()))
            .expect("registered once");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let in_progress = gauge(
            "stitch_uploads_in_progress",
            "Uploads in store that are not delivered yet (receiving, complete, or owed).",
        );
        let stored_bytes = gauge(
            "stitch_stored_bytes",
            "Bytes the upload store holds (each distinct content once).",
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        Metrics {
            registry,
            requests,
            request_seconds,
            received_bytes,
            parts_stored,
            parts_deduplicated,
            deduplicated_bytes,
            uploads,
            deliveries,
            early,
            delivery_seconds,
            upstream_responses,
            queue_length,
            in_progress,
            stored_bytes,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        out
    }

    pub fn upload_event(&self, event: &str) {
        self.uploads.with_label_values(&[event]).inc();
    }
}

/// `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The operators' listener: `GET /metrics` (Prometheus text format), `GET /healthz` (the process
/// serves), `GET /readyz` (the store takes a write and the upstream takes a connection) and
/// `GET /uploads` (the listing, JSON; a bearer token when configured).
pub struct OperatorsApp {
    pub core: Arc<UploadCore>,
    pub upstream: SocketAddr,
    pub config: MetricsConfig,
    /// Held while a readiness check's write to the storage is under way.
    pub store_check: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait]
impl ServeHttp for OperatorsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The connection's header deadline no longer applies (a listing may take seconds).
        crate::proxy::connections::header_arrived();
        let header = session.req_header();
        if header.method != Method::GET && header.method != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, b"GET only\n".to_vec());
        }
        match header.uri.path() {
            "/metrics" => self.metrics().await,
            "/healthz" => reply(StatusCode::OK, TEXT, b"ok\n".to_vec()),
            "/readyz" => self.readiness().await,
            "/uploads" => match self.refusal(header.headers.get(http::header::AUTHORIZATION)) {
                Some(refusal) => refusal,
                None => self.listing().await,
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                b"/metrics, /healthz, /readyz or /uploads\n".to_vec(),
            ),
        }
    }
}

impl OperatorsApp {
    async fn metrics(&self) -> Response<Vec<u8>> {
        let metrics = &self.core.metrics;
        // A stalled disk does not hold the scrape: the gauges keep their last values.
        match self.inventory_within(false, READY_TIMEOUT).await {
            Ok(inventory) => {
                let in_progress = inventory.uploads.iter().filter(|u| u.in_progress()).count();
                metrics.in_progress.set(in_progress as i64);
                metrics.stored_bytes.set(inventory.stored_bytes as i64);
                metrics.queue_length.set(inventory.queued as i64);
            }
            // The gauges keep their last values; the rest of the exposition still helps.
            Err(e) => tracing::warn!("cannot count the uploads in store for metrics: {e}"),
        }
        reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        )
    }

    async fn readiness(&self) -> Response<Vec<u8>> {
        let upstream =
            tokio::time::timeout(READY_TIMEOUT, tokio::net::TcpStream::connect(self.upstream))
                .await;
        let problems: Vec<String> = [
            self.store_problem().await,
            match upstream {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("the upstream cannot be reached: {e}")),
                Err(_) => Some("the upstream does not accept connections".into()),
            },
        ]
        .into_iter()
        .flatten()
        .collect();
        if problems.is_empty() {
            reply(StatusCode::OK, TEXT, b"ready\n".to_vec())
        } else {
            let body = format!("not ready: {}\n", problems.join("; "));
            reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body.into_bytes())
        }
    }

    /// Why the storage does not take a one-byte write, if it does not within
    /// [`READY_TIMEOUT`]. A write that a stalled disk holds goes on in the background, and
    /// until it ends, further checks report it rather than start another.
    async fn store_problem(&self) -> Option<String> {
        let Ok(one) = self.store_check.clone().try_lock_owned() else {
            return Some("storage has not yet taken the write of an earlier check".into());
        };
        let core = self.core.clone();
        let check = tokio::spawn(async move {
            let _one = one;
            core.check_store().await
        });
        match tokio::time::timeout(READY_TIMEOUT, check).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(format!("storage does not take writes: {e}")),
            Ok(Err(e)) => Some(format!("the storage check failed: {e}")),
            Err(_) => Some(format!(
                "storage did not take a one-byte write within {READY_TIMEOUT:?}"
            )),
        }
    }

    /// 401 unless the request carries the configured bearer token (compared in constant time).
    fn refusal(&self, authorization: Option<&http::HeaderValue>) -> Option<Response<Vec<u8>>> {
        let expected = self.config.token.as_ref()?;
        let given = authorization
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let same = given.len() == expected.len()
            && given
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        if same {
            return None;
        }
        let mut refusal = reply(
            StatusCode::UNAUTHORIZED,
            TEXT,
            b"the listing needs the operators' bearer token\n".to_vec(),
        );
        refusal.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"stitch\""),
        );
        Some(refusal)
    }

    /// The uploads in store, unless the store takes longer than `within` to list them.
    async fn inventory_within(
        &self,
        file_names: bool,
        within: Duration,
    ) -> Result<crate::upload::Inventory, crate::store::StoreError> {
        tokio::time::timeout(within, self.core.inventory(file_names))
            .await
            .unwrap_or_else(|_| {
                Err(crate::store::StoreError::Io(std::io::Error::other(
                    format!("the store did not answer within {within:?}"),
                )))
            })
    }

    async fn listing(&self) -> Response<Vec<u8>> {
        match self
            .inventory_within(self.config.file_names, LISTING_TIMEOUT)
            .await
        {
            Ok(inventory) => {
                let body = serde_json::json!({
                    "uploads": inventory.uploads,
                    "stored_bytes": inventory.stored_bytes,
                });
                let mut body = serde_json::to_vec_pretty(&body).expect("serializable");
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            Err(e) => {
                tracing::error!("cannot list the uploads in store: {e}");
                let body = format!("cannot list the uploads in store: {e}\n");
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, body.into_bytes())
            }
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// How long readiness waits for the upstream's connection.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the listing may take (a stalled disk, or a blocking pool held by writes waiting
/// for it, would hold it for as long): then it is `503`.
const LISTING_TIMEOUT: Duration = Duration::from_secs(10);
