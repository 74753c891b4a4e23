//! Slow, idle and too many clients cannot hold the proxy: each connection limit is enforced
//! with the status the README documents, and healthy clients keep working meanwhile.

mod common;

use common::raw::RawConnection;
use common::*;
use std::time::{Duration, Instant};

fn with_limits(limits: &str) -> String {
    format!("connections:\n{limits}{ROUTES}")
}

fn addr(h: &Harness) -> std::net::SocketAddr {
    h.stitch.as_ref().unwrap().addr
}

#[tokio::test]
async fn a_header_trickled_one_byte_at_a_time_is_cut_at_the_header_timeout() {
    let h = Harness::with_routes(&with_limits("  header_timeout: 1s\n")).await;
    let mut slow = RawConnection::open(addr(&h)).await;
    // Each byte comes well within any per-read timeout; the whole header never does.
    let cut = slow
        .trickle_header_until_cut(b"GET /elsewhere HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("the trickling client was never cut");
    assert!(cut < Duration::from_secs(8), "cut after {cut:?}");
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let h = Harness::with_routes(&with_limits("  idle_timeout: 1s\n")).await;
    let mut client = RawConnection::open(addr(&h)).await;
    assert!(
        client
            .send(b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
    );
    let first = client.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.status, 200);
    // Within the idle timeout the connection serves the next request...
    assert!(
        client
            .send(b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
    );
    assert_eq!(
        client
            .response(Duration::from_secs(10))
            .await
            .unwrap()
            .status,
        200
    );
    // ...then, left idle, it is closed.
    assert!(
        client.closed_within(Duration::from_secs(10)).await,
        "the idle connection stayed open"
    );
}

/// The idle timeout counts from the end of the last request, not from the connection's start:
/// a connection kept busy for longer than it stays open (the timer set for its first wait goes
/// off while it is busy and must not close it).
#[tokio::test]
async fn a_busy_kept_alive_connection_outlives_the_idle_timeout() {
    let h = Harness::with_routes(&with_limits("  idle_timeout: 1s\n  header_timeout: 1s\n")).await;
    let mut client = RawConnection::open(addr(&h)).await;
    // Nine requests 300 ms apart: the connection stays busy for more than twice idle_timeout.
    for n in 1..=9 {
        assert!(
            client
                .send(b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
                .await,
            "the connection was closed before request {n}"
        );
        let answer = client.response(Duration::from_secs(10)).await;
        assert_eq!(answer.map(|r| r.status), Some(200), "request {n}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        client.closed_within(Duration::from_secs(10)).await,
        "the idle connection stayed open"
    );
}

#[tokio::test]
async fn a_chunk_body_that_stalls_gets_408_and_stores_nothing() {
    let h = Harness::with_routes(&with_limits("  body_timeout: 1s\n")).await;
    let file = ChunkedFile::resumable("stall.bin", random_bytes(3000, 100), 1000);
    assert_eq!(file.upload(&h, 1).await.status(), 200);
    let before = h.stored_files();
    let mut client = RawConnection::open(addr(&h)).await;
    let head = format!(
        "POST /upload?{} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n",
        file.query_string(2)
    );
    assert!(client.send(head.as_bytes()).await);
    assert!(client.send(&[7u8; 10]).await);
    let answer = client.response(Duration::from_secs(10)).await;
    assert_eq!(answer.map(|r| r.status), Some(408));
    assert_eq!(
        h.stored_files(),
        before,
        "nothing stored, nothing left in tmp/"
    );
}

#[tokio::test]
async fn a_passed_through_body_that_stalls_gets_408() {
    let h = Harness::with_routes(&with_limits("  body_timeout: 1s\n")).await;
    let mut client = RawConnection::open(addr(&h)).await;
    let head = "POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n";
    assert!(client.send(head.as_bytes()).await);
    assert!(client.send(&[7u8; 10]).await);
    let answer = client.response(Duration::from_secs(10)).await;
    assert_eq!(answer.map(|r| r.status), Some(408));
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_a_freed_slot_serves_again() {
    let h = Harness::with_routes(&with_limits("  max: 3\n")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(RawConnection::served(addr(&h), "/elsewhere").await);
    }
    let mut fourth = RawConnection::open(addr(&h)).await;
    let refused = fourth.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(refused.status, 503);
    assert!(fourth.closed_within(Duration::from_secs(5)).await);

    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = RawConnection::open(addr(&h)).await;
        next.send(b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        let status = next
            .response(Duration::from_secs(10))
            .await
            .map(|r| r.status);
        if status == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot never served: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_client_address_cannot_take_more_than_its_share() {
    let h = Harness::with_routes(&with_limits("  max_per_client: 2\n")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(RawConnection::served(addr(&h), "/elsewhere").await);
    }
    let mut third = RawConnection::open(addr(&h)).await;
    let refused = third.response(Duration::from_secs(10)).await.unwrap();
    assert_eq!(refused.status, 503);
    drop(held);
}

#[tokio::test]
async fn a_header_over_the_size_limit_gets_431_and_a_smaller_one_passes() {
    let h = Harness::with_routes(&with_limits("  max_header_size: 4KiB\n")).await;
    let mut big = RawConnection::open(addr(&h)).await;
    let head = format!(
        "GET /elsewhere HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(6000)
    );
    assert!(big.send(head.as_bytes()).await);
    assert_eq!(
        big.response(Duration::from_secs(10)).await.unwrap().status,
        431
    );
    let mut small = RawConnection::open(addr(&h)).await;
    let head = format!(
        "GET /elsewhere HTTP/1.1\r\nHost: a\r\nX-Small: {}\r\n\r\n",
        "s".repeat(2000)
    );
    assert!(small.send(head.as_bytes()).await);
    assert_eq!(
        small
            .response(Duration::from_secs(10))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        h.upstream.received().len(),
        1,
        "only the small one reached the application"
    );
}

#[tokio::test]
async fn healthy_clients_keep_working_while_250_slow_ones_are_connected() {
    let h = Harness::start().await;
    let mut slow = Vec::new();
    for i in 0..250 {
        let mut c = RawConnection::open(addr(&h)).await;
        let partial = format!("POST /upload?resumableChunkNumber={i} HTTP/1.1\r\nHost: a\r\n");
        assert!(c.send(partial.as_bytes()).await);
        slow.push(c);
    }
    let file = ChunkedFile::flow("healthy.bin", random_bytes(3 << 20, 101), 1 << 20);
    let done = tokio::time::timeout(Duration::from_secs(60), file.upload_all(&h))
        .await
        .expect("the healthy upload finished while slow clients were connected");
    assert_eq!(done.status(), 200);
    assert_delivered_once(&h, &file);
    drop(slow);
}

#[tokio::test]
async fn a_multipart_chunk_that_stalls_gets_408_too() {
    // After `body_timeout`, not twice that (the fields after the file part were once waited
    // for too).
    let h = Harness::with_routes(&with_limits("  body_timeout: 2s\n")).await;
    let file = ChunkedFile::flow("stall.bin", random_bytes(3000, 102), 1000);
    let (boundary, head, _) = multipart_frame(&file.params(1), "file", &file.name, "text/plain");
    let mut client = RawConnection::open(addr(&h)).await;
    let request = format!(
        "POST /flow HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; \
         boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        head.len() + 1000 + 64
    );
    assert!(client.send(request.as_bytes()).await);
    assert!(client.send(&head).await);
    assert!(client.send(&[7u8; 100]).await);
    let stalled = Instant::now();
    let answer = client.response(Duration::from_secs(10)).await;
    assert_eq!(answer.map(|r| r.status), Some(408));
    assert!(
        stalled.elapsed() < Duration::from_millis(3500),
        "answered {:?} after the body stalled",
        stalled.elapsed()
    );
    assert_eq!(h.upload_files(), 0, "nothing stored");
}
