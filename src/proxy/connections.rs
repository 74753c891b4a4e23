//! Limits on client connections, so that slow or idle clients cannot hold the proxy: how many
//! connections (in all, and per client address), how long a request header may take, how long
//! a kept-alive connection may sit idle.
//!
//! Pingora 0.9 has none of these for HTTP/1: it reads a header with a per-read timeout only
//! (a client sending one byte a second is never cut) and keeps HTTP/1.1 connections alive
//! forever after the first request. So the listener runs [`Guarded`], which counts each
//! connection and drives Pingora's HTTP/1 request loop itself:
//!
//! 1. wait for the first byte of a request: `header_timeout` on a new connection,
//!    `idle_timeout` between requests on a kept-alive one; silence closes the connection;
//! 2. hand the connection to the proxy for one request, and close it if the whole header has
//!    not arrived `header_timeout` after that first byte (the proxy marks the header's arrival
//!    through [`header_arrived`], from its first filter);
//! 3. repeat while the proxy hands the connection back.
//!
//! Its stream is [`Tapped`], so that a request's trailers can be read (see `trailers`).
//!
//! The statuses (README, "Connections"): over a connection limit, 503 and the connection
//! closed at once; a header too slow, the connection closed without an answer (there is no
//! request to answer yet); a header over `max_header_size`, 431 (see `StitchProxy`); a body
//! that stalls longer than `body_timeout`, 408.

use crate::config::ConnectionLimits;
use crate::drain::InFlight;
use crate::proxy::trailers::{Tap, Tapped};
use async_trait::async_trait;
use dashmap::DashMap;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

tokio::task_local! {
    /// Set by the proxy once a request's header has been read (HTTP/1 runs each connection in
    /// one task, so the proxy's filters see the value [`Guarded`] put there).
    static HEADER_ARRIVED: Arc<AtomicBool>;
}

/// Tells the connection's guard that the whole request header is in: the header deadline no
/// longer applies. A no-op outside a guarded connection.
pub fn header_arrived() {
    let _ = HEADER_ARRIVED.try_with(|arrived| arrived.store(true, Ordering::Relaxed));
}

/// An HTTP/1 application behind connection limits.
pub struct Guarded<A> {
    app: Arc<A>,
    limits: ConnectionLimits,
    open: OpenConnections,
    /// Requests being answered (not connections waiting for their next request).
    in_flight: InFlight,
}

impl<A> Guarded<A> {
    pub fn new(app: A, limits: ConnectionLimits, in_flight: InFlight) -> Guarded<A> {
        Guarded {
            app: Arc::new(app),
            limits,
            open: OpenConnections::default(),
            in_flight,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let Some(_slot) = self.open.admit(client, &self.limits) else {
            refuse(stream).await;
            return None;
        };
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut kept_alive = false;
        let mut alarm: Option<Alarm> = None;
        let arrived = Arc::new(AtomicBool::new(false));
        let tap = Tap::new(arrived.clone());
        let mut stream: Stream = Box::new(Tapped::new(stream, tap.clone()));
        loop {
            let wait = match kept_alive {
                false => self.limits.header_timeout,
                true => self.limits.idle_timeout,
            };
            if !first_byte(&mut stream, Instant::now() + wait, &mut alarm).await {
                return None;
            }
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => session.set_keepalive(Some(self.limits.idle_timeout.as_secs().max(1))),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let working = self.in_flight.start();
            let request = self.app.process_new_http(session, shutdown);
            let reused =
                within_header_deadline(request, &arrived, self.limits.header_timeout).await?;
            drop(working);
            // What the tap kept of the request is not held while the connection waits.
            tap.restart();
            (stream, settings) = reused?.consume();
            kept_alive = true;
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// A connection's timer for its waits between requests, kept from one wait to the next. A
/// request that comes before it is due leaves it set; the next wait, whose deadline is later,
/// sets it again only once it has gone off. So a busy connection sets a timer about once per
/// `idle_timeout`, not once per request (a timer per request cost the pass-through rate a few
/// per cent). Pingora's timer: 10 ms slots shared by every timeout due in the same slot, the
/// one its own reads use.
struct Alarm {
    due: Instant,
    ringing: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

/// Waits for the first byte of the connection's next request until `deadline`: false if none
/// came by then, or the connection closed or failed.
async fn first_byte(stream: &mut Stream, deadline: Instant, alarm: &mut Option<Alarm>) -> bool {
    loop {
        let now = Instant::now();
        let set = match alarm {
            Some(alarm) if alarm.due <= deadline => alarm,
            _ if now >= deadline => return false,
            _ => alarm.insert(Alarm {
                due: deadline,
                ringing: Box::pin(pingora::time::sleep(deadline - now)),
            }),
        };
        let mut byte = [0u8; 1];
        tokio::select! {
            biased;
            peeked = stream.try_peek(&mut byte) => return matches!(peeked, Ok(true)),
            () = set.ringing.as_mut() => {}
        }
        *alarm = None;
    }
}

/// Runs one request, unless its header is still incomplete `deadline` after it began. `None`:
/// the deadline passed (the request is dropped, which closes the connection). `arrived` is the
/// connection's flag that [`header_arrived`] sets.
async fn within_header_deadline<F: Future>(
    request: F,
    arrived: &Arc<AtomicBool>,
    deadline: std::time::Duration,
) -> Option<F::Output> {
    arrived.store(false, Ordering::Relaxed);
    let request = HEADER_ARRIVED.scope(arrived.clone(), request);
    tokio::pin!(request);
    // The first byte is in, so the whole header usually is too: the first poll reads it, and
    // then no timer is needed.
    let first = std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await;
    if let Poll::Ready(output) = first {
        return Some(output);
    }
    if arrived.load(Ordering::Relaxed) {
        return Some(request.await);
    }
    tokio::select! {
        output = &mut request => return Some(output),
        () = pingora::time::sleep(deadline) => {}
    }
    if !arrived.load(Ordering::Relaxed) {
        tracing::debug!("a request header took longer than {deadline:?}; connection closed");
        return None;
    }
    Some(request.await)
}

/// Answers a connection over the limits with 503 and closes it, after reading (and throwing
/// away) what the client sends for a moment, so that it sees the answer rather than a reset.
async fn refuse(mut stream: Stream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
        Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n";
    let _ = stream.write_all(BUSY).await;
    let _ = stream.flush().await;
    let linger = async {
        let mut sink = [0u8; 16 << 10];
        while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), linger).await;
    let _ = stream.shutdown().await;
}

/// Open connections, in all and per client address.
#[derive(Default)]
struct OpenConnections {
    total: Arc<AtomicUsize>,
    per_client: Arc<DashMap<IpAddr, usize>>,
}

/// One admitted connection; counted until dropped.
struct Slot {
    total: Arc<AtomicUsize>,
    per_client: Arc<DashMap<IpAddr, usize>>,
    client: Option<IpAddr>,
}

impl OpenConnections {
    fn admit(&self, client: Option<IpAddr>, limits: &ConnectionLimits) -> Option<Slot> {
        if self.total.fetch_add(1, Ordering::SeqCst) >= limits.max {
            self.total.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("refused a connection: {} connections are open", limits.max);
            return None;
        }
        let slot = Slot {
            total: self.total.clone(),
            per_client: self.per_client.clone(),
            client: None,
        };
        let (Some(ip), Some(max)) = (client, limits.max_per_client) else {
            return Some(slot);
        };
        let mut count = self.per_client.entry(ip).or_insert(0);
        if *count >= max {
            drop(count);
            tracing::warn!("refused a connection from {ip}: it has {max} open");
            return None;
        }
        *count += 1;
        let mut slot = slot;
        slot.client = Some(ip);
        Some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        if let Some(ip) = self.client {
            if let Some(mut count) = self.per_client.get_mut(&ip) {
                *count -= 1;
            }
            self.per_client.remove_if(&ip, |_, count| *count == 0);
        }
    }
}
