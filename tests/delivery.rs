//! Exactly-once delivery, replayed answers, retries after upstream failures, restarts, dedup and
//! scoping: the guarantees that make uploads survive the real world.

mod common;

use common::*;
use futures::future::join_all;
use sha2::{Digest as _, Sha256};
use std::time::Duration;

#[tokio::test]
async fn the_same_chunk_sent_twice_is_stored_once_without_error() {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("twice.txt", random_bytes(4000, 10), 1000);
    let concurrent = join_all([file.upload(&h, 1), file.upload(&h, 1), file.upload(&h, 1)]).await;
    assert!(concurrent.iter().all(|r| r.status() == 200));
    assert_eq!(file.upload(&h, 1).await.status(), 200, "sequential repeat");
    assert_eq!(h.blob_count(), 1, "one chunk, one stored blob");
    assert_eq!(file.test(&h, 1).await.status(), 200);
    for n in 2..=file.count() {
        file.upload(&h, n).await;
    }
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn requests_completing_an_upload_at_once_share_one_forward_and_its_answer() {
    let h = Harness::start().await;
    // An answer that records nothing: only sharing the one delivery keeps the others from
    // sending the file again. Slow, so that the three requests, sent together, meet in it even
    // on a loaded machine.
    h.upstream.answer_with(503, "busy");
    h.upstream.delay_answers(Duration::from_secs(2));
    let file = ChunkedFile::flow("race.bin", random_bytes(3000, 11), 1000);
    file.upload(&h, 1).await;
    file.upload(&h, 2).await;

    let finals = join_all([file.upload(&h, 3), file.upload(&h, 3), file.upload(&h, 3)]).await;

    for response in finals {
        assert_eq!(response.status(), 503);
        assert_eq!(response.text().await.unwrap(), "busy");
    }
    assert_eq!(
        h.upstream.received_at("/app/upload").len(),
        1,
        "one forward for the three"
    );
}

#[tokio::test]
async fn different_last_chunks_racing_still_deliver_once() {
    let h = Harness::start().await;
    h.upstream.delay_answers(Duration::from_millis(200));
    let file = ChunkedFile::resumable("pair.bin", random_bytes(8000, 12), 1000);
    for n in 1..=6 {
        file.upload(&h, n).await;
    }
    let responses = join_all([file.upload(&h, 7), file.upload(&h, 8)]).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn retried_final_chunk_replays_the_upstream_answer() {
    let h = Harness::start().await;
    h.upstream.answer_with(201, r#"{"id":99}"#);
    let file = ChunkedFile::resumable("retry.txt", random_bytes(2000, 13), 1000);
    let first = file.upload_all(&h).await;
    assert_eq!(first.status(), 201);
    assert_eq!(first.headers().get("x-upstream").unwrap(), "demo-app");

    let retried = file.upload(&h, 2).await;
    assert_eq!(retried.status(), 201);
    assert_eq!(retried.headers().get("x-upstream").unwrap(), "demo-app");
    assert_eq!(retried.text().await.unwrap(), r#"{"id":99}"#);
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn a_page_reload_after_delivery_resends_the_file_and_gets_the_answer_without_a_second_delivery(
) {
    let h = Harness::start().await;
    h.upstream.answer_with(201, r#"{"id":7}"#);
    let file = ChunkedFile::resumable("reload.bin", random_bytes(3000, 40), 1000);
    assert_eq!(file.upload_all(&h).await.status(), 201);
    // A test cannot prove the client has the same file: "not stored", so it sends the bytes.
    for n in 1..=file.count() {
        assert_eq!(file.test(&h, n).await.status(), 204, "test of chunk {n}");
        let resent = file.upload(&h, n).await;
        assert_eq!(
            resent.status(),
            201,
            "chunk {n} carries the delivered bytes"
        );
        assert_eq!(resent.text().await.unwrap(), r#"{"id":7}"#);
    }
    assert_delivered_once(&h, &file);
    assert_eq!(h.blob_count(), 0, "the resent copy is not kept");
}

#[tokio::test]
async fn a_different_file_under_a_delivered_identifier_is_delivered_not_answered_from_the_first() {
    let h = Harness::start().await;
    let first = ChunkedFile::resumable("c.bin", random_bytes(7_000_000, 41), 1 << 20);
    assert_eq!(first.upload_all(&h).await.status(), 200);
    // Same name and size, so the same default identifier; other bytes.
    let second = ChunkedFile::resumable("c.bin", random_bytes(7_000_000, 42), 1 << 20);
    assert_eq!(second.identifier, first.identifier);
    h.upstream.answer_with(201, "second");
    let done = second.upload_all(&h).await;
    assert_eq!(done.status(), 201);
    assert_eq!(done.text().await.unwrap(), "second");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2, "both files reach the application");
    assert_eq!(received[0].files[0].sha256, first.sha256());
    assert_eq!(received[1].files[0].sha256, second.sha256());
}

#[tokio::test]
async fn a_new_file_sharing_chunks_with_the_delivered_one_arrives_whole() {
    let h = Harness::start().await;
    let old = random_bytes(3000, 43);
    let first = ChunkedFile::flow("edited.txt", old.clone(), 1000);
    first.upload_all(&h).await;
    // The same document edited in its first kilobyte only.
    let mut new = old.to_vec();
    new[..1000].copy_from_slice(&random_bytes(1000, 44));
    let second = ChunkedFile::flow("edited.txt", new.into(), 1000);
    h.upstream.answer_with(201, "edited");
    // Chunk 2 arrives first and matches what was delivered: it gets that answer...
    assert_eq!(second.upload(&h, 2).await.status(), 200);
    // ...and is kept, so when chunk 1 shows the file is new, nothing is missing.
    assert_eq!(second.upload(&h, 1).await.status(), 200);
    let done = second.upload(&h, 3).await;
    assert_eq!(done.status(), 201);
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].files[0].sha256, second.sha256());
}

/// Sends `file` as both clients do: each chunk in turn is tested, and sent if missing. Returns
/// each test's status and the last chunk's answer.
async fn send_as_a_client(h: &Harness, file: &ChunkedFile) -> (Vec<u16>, reqwest::Response) {
    let (mut tests, mut last) = (Vec::new(), None);
    for n in 1..=file.count() {
        let test = file.test(h, n).await.status().as_u16();
        tests.push(test);
        if test == 204 {
            last = Some(file.upload(h, n).await);
        }
    }
    (tests, last.expect("a chunk sent"))
}

/// A delivered file's chunk sent again after its answer (the retry of a request whose answer
/// was lost to a crash or a cut connection) gets the answer and is kept. A new file of the
/// same name and size (so the same identifier) must not take it for one of its own.
async fn a_chunk_retried_after_delivery_stays_out_of_a_new_file(retried: u64) {
    let h = Harness::start().await;
    let first = ChunkedFile::resumable("doc.bin", random_bytes(3000, 51), 1000);
    first.upload_all(&h).await;
    let again = first.upload(&h, retried).await;
    assert_eq!(again.status(), 200, "the delivered file's answer");
    let second = ChunkedFile::resumable("doc.bin", random_bytes(3000, 52), 1000);
    assert_eq!(second.identifier, first.identifier);
    h.upstream.answer_with(201, "second");

    let (tests, done) = send_as_a_client(&h, &second).await;

    assert_eq!(
        tests,
        [204, 204, 204],
        "every chunk of the new file is missing"
    );
    assert_eq!(done.status(), 201);
    assert_eq!(done.text().await.unwrap(), "second");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2, "each file delivered once");
    assert_eq!(received[0].files[0].sha256, first.sha256());
    assert_eq!(received[1].files[0].sha256, second.sha256(), "not spliced");
}

#[tokio::test]
async fn a_middle_chunk_retried_after_delivery_is_not_reported_stored_for_a_new_file() {
    a_chunk_retried_after_delivery_stays_out_of_a_new_file(2).await;
}

#[tokio::test]
async fn a_last_chunk_retried_after_delivery_does_not_complete_a_new_file() {
    a_chunk_retried_after_delivery_stays_out_of_a_new_file(3).await;
}

#[tokio::test]
async fn a_new_file_sharing_its_first_chunks_with_the_delivered_one_keeps_them_past_a_stale_retry()
{
    let h = Harness::start().await;
    let old = random_bytes(3000, 53);
    let first = ChunkedFile::resumable("grown.txt", old.clone(), 1000);
    first.upload_all(&h).await;
    // A stale retry of the delivered file's last chunk, then the same document edited in its
    // last kilobyte only, sent the way a client sends it.
    first.upload(&h, 3).await;
    let mut new = old.to_vec();
    new[2000..].copy_from_slice(&random_bytes(1000, 54));
    let second = ChunkedFile::resumable("grown.txt", new.into(), 1000);
    h.upstream.answer_with(201, "edited");

    let (tests, done) = send_as_a_client(&h, &second).await;

    assert_eq!(tests, [204, 204, 204]);
    assert_eq!(done.status(), 201, "chunk 3 completes the new file");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].files[0].sha256, second.sha256());
}

#[tokio::test]
async fn a_page_reload_sends_again_the_chunks_a_new_file_kept_from_the_delivered_one() {
    let h = Harness::start().await;
    let old = random_bytes(4000, 55);
    let first = ChunkedFile::resumable("notes.txt", old.clone(), 1000);
    first.upload_all(&h).await;
    // The same document edited in its third kilobyte: chunks 1 and 2 match the delivered file
    // and are kept for the new one when chunk 3 shows it is new.
    let mut new = old.to_vec();
    new[2000..3000].copy_from_slice(&random_bytes(1000, 56));
    let second = ChunkedFile::resumable("notes.txt", new.into(), 1000);
    h.upstream.answer_with(201, "edited");
    for n in 1..=3 {
        assert_eq!(second.test(&h, n).await.status(), 204);
        second.upload(&h, n).await;
    }
    // The page is reloaded before chunk 4: its client tests every chunk again. The chunks kept
    // from the delivered file may be another client's, so they are asked for again; chunk 3,
    // stored by this upload, is not.
    let mut tests = Vec::new();
    for n in 1..=4 {
        tests.push(second.test(&h, n).await.status().as_u16());
    }
    assert_eq!(tests, [204, 204, 200, 204]);
    for n in [1, 2] {
        assert_eq!(second.upload(&h, n).await.status(), 200);
    }
    let done = second.upload(&h, 4).await;
    assert_eq!(done.status(), 201);
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[1].files[0].sha256,
        second.sha256(),
        "the new file, whole"
    );
}

#[tokio::test]
async fn after_a_successful_delivery_the_parts_are_removed() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("cleanup.txt", random_bytes(3000, 14), 1000);
    file.upload_all(&h).await;
    assert_delivered_once(&h, &file);
    assert_eq!(h.blob_count(), 0, "no chunk bytes left after a 2xx");
}

#[tokio::test]
async fn upstream_down_at_completion_keeps_the_parts_and_a_retry_delivers_once() {
    let h = Harness::start().await;
    let file = ChunkedFile::resumable("later.txt", random_bytes(3000, 15), 1000);
    file.upload(&h, 1).await;
    file.upload(&h, 2).await;
    h.upstream.go_down();

    let failed = file.upload(&h, 3).await;
    assert_eq!(failed.status(), 502);
    assert_eq!(h.blob_count(), 3, "all parts kept");
    assert!(h.upstream.received().is_empty());

    h.upstream.resume().await;
    let retried = file.upload(&h, 3).await;
    assert_eq!(retried.status(), 200);
    assert_delivered_once(&h, &file);
    assert_eq!(
        file.upload(&h, 3).await.status(),
        200,
        "a further retry replays"
    );
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn a_complete_file_whose_browser_left_is_delivered_by_the_queue_with_its_fields() {
    let routes = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, retry_pause: 200ms }
"#;
    let h = Harness::with_routes(routes).await;
    let mut file = ChunkedFile::resumable("left.bin", random_bytes(3000, 17), 1000);
    file.extra.push(("folder".into(), "inbox".into()));
    file.headers.push(("cookie".into(), "session=s1".into()));
    file.upload(&h, 1).await;
    file.upload(&h, 2).await;
    h.upstream.go_down();
    let failed = file.upload(&h, 3).await;
    assert_eq!(failed.status(), 502);
    // The browser is gone; the application comes back.
    h.upstream.answer_with(201, r#"{"id":5}"#);
    h.upstream.resume().await;
    wait_for_requests(&h, "/app/upload", 1, Duration::from_secs(20)).await;
    let received = assert_delivered_once(&h, &file);
    assert_eq!(
        received.field("folder"),
        Some("inbox"),
        "the completing request's fields"
    );
    assert_eq!(
        received.header("cookie"),
        Some("session=s1"),
        "and its credentials"
    );
    // A page reload that sends the last chunk again gets the answer, with no second delivery.
    let again = file.upload(&h, 3).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.text().await.unwrap(), r#"{"id":5}"#);
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn an_upstream_server_error_keeps_the_parts_for_a_retry() {
    let h = Harness::start().await;
    h.upstream.answer_with(503, "busy");
    let file = ChunkedFile::flow("busy.txt", random_bytes(2000, 16), 1000);
    let failed = file.upload_all(&h).await;
    assert_eq!(failed.status(), 503);
    assert_eq!(failed.text().await.unwrap(), "busy");
    assert_eq!(h.blob_count(), 2);

    h.upstream.answer_with(200, "ok now");
    let retried = file.upload(&h, 2).await;
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.text().await.unwrap(), "ok now");
    assert_eq!(
        h.upstream.received_at("/app/upload").len(),
        2,
        "one failed, one accepted"
    );
    assert_eq!(h.blob_count(), 0);
}

#[tokio::test]
async fn a_final_client_error_from_the_upstream_is_recorded_and_replayed() {
    let h = Harness::start().await;
    h.upstream.answer_with(422, r#"{"error":"virus"}"#);
    let file = ChunkedFile::resumable("bad.exe", random_bytes(2000, 17), 1000);
    assert_eq!(file.upload_all(&h).await.status(), 422);
    assert_eq!(h.blob_count(), 0, "a final 4xx ends the upload");
    h.upstream.answer_with(200, "would accept now");
    let retried = file.upload(&h, 2).await;
    assert_eq!(retried.status(), 422);
    assert_eq!(retried.text().await.unwrap(), r#"{"error":"virus"}"#);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn a_restart_mid_upload_keeps_every_stored_part() {
    let mut h = Harness::start().await;
    let file = ChunkedFile::resumable("restart.bin", random_bytes(5000, 18), 1000);
    for n in [1, 2, 4] {
        assert_eq!(file.upload(&h, n).await.status(), 200);
    }
    h.restart();
    for (n, expected) in [(1, 200), (2, 200), (3, 204), (4, 200), (5, 204)] {
        assert_eq!(file.test(&h, n).await.status(), expected, "chunk {n}");
    }
    file.upload(&h, 3).await;
    assert_eq!(file.upload(&h, 5).await.status(), 200);
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn a_complete_upload_found_by_test_requests_is_delivered_by_them() {
    let mut h = Harness::start().await;
    h.upstream.go_down();
    let file = ChunkedFile::flow("reload.txt", random_bytes(2000, 19), 1000);
    file.upload(&h, 1).await;
    assert_eq!(file.upload(&h, 2).await.status(), 502);
    h.upstream.resume().await;
    h.upstream.answer_with(200, "delivered on test");
    h.restart();
    // A page reload: the client tests every chunk again before sending anything.
    let test = file.test(&h, 1).await;
    assert_eq!(test.status(), 200);
    assert_eq!(test.text().await.unwrap(), "delivered on test");
    assert_delivered_once(&h, &file);
}

#[tokio::test]
async fn identical_chunks_of_different_uploads_are_stored_once() {
    let h = Harness::start().await;
    let data = random_bytes(3000, 20);
    let a = ChunkedFile::resumable("a.txt", data.clone(), 1000);
    let mut b = ChunkedFile::resumable("b.txt", data, 1000);
    b.identifier = "other-upload".into();
    a.upload(&h, 1).await;
    b.upload(&h, 1).await;
    b.upload(&h, 2).await;
    assert_eq!(h.blob_count(), 2, "chunk 1 is shared");
    assert_eq!(h.part_count(), 3, "each upload still has its own parts");
    b.upload(&h, 3).await;
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
    assert_eq!(h.blob_count(), 1, "a's chunk 1 survives b's cleanup");
    assert_eq!(a.test(&h, 1).await.status(), 200);
}

#[tokio::test]
async fn the_forward_carries_the_clients_cookie_and_authorization() {
    let h = Harness::start().await;
    let file = ChunkedFile::flow("auth.txt", random_bytes(10, 21), 1000);
    let query = file.query_string(1);
    let response = h
        .client
        .post(h.url(&format!("/flow?{query}")))
        .header("cookie", "session=abc")
        .header("authorization", "Bearer xyz")
        .header("x-other", "not forwarded")
        .body(random_bytes(10, 21))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.header("cookie"), Some("session=abc"));
    assert_eq!(request.header("authorization"), Some("Bearer xyz"));
    assert_eq!(request.header("x-other"), None);
    assert_eq!(request.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn scoped_uploads_of_two_users_with_the_same_identifier_stay_apart() {
    let h = Harness::with_routes(
        r#"
routes:
  - path: /upload
    protocol: resumable
    scope: { cookie: session }
    forward: { path: /app/upload, field: document }
"#,
    )
    .await;
    let file = ChunkedFile::resumable("same.txt", random_bytes(2000, 22), 1000);
    let query = |n| file.query_string(n);
    let send = |n: u64, cookie: &'static str| {
        let (start, end) = file.bounds(n);
        h.client
            .post(h.url(&format!("/upload?{}", query(n))))
            .header("cookie", cookie)
            .body(file.data.slice(start, end))
            .send()
    };
    assert_eq!(send(1, "session=alice").await.unwrap().status(), 200);
    let test_as = |n: u64, cookie: &'static str| {
        h.client
            .get(h.url(&format!("/upload?{}", query(n))))
            .header("cookie", cookie)
            .send()
    };
    assert_eq!(
        test_as(1, "session=bob").await.unwrap().status(),
        204,
        "bob sees nothing"
    );
    assert_eq!(send(2, "session=bob").await.unwrap().status(), 200);
    assert!(
        h.upstream.received().is_empty(),
        "bob cannot complete alice's upload"
    );
    assert_eq!(send(2, "session=alice").await.unwrap().status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.header("cookie"), Some("session=alice"));
}

#[tokio::test]
async fn an_upstream_500_reaches_the_client_as_502_so_it_retries_and_the_retry_delivers() {
    let h = Harness::start().await;
    h.upstream.answer_with(500, "database down");
    let file = ChunkedFile::resumable("flaky.txt", random_bytes(2000, 23), 1000);
    let failed = file.upload_all(&h).await;
    assert_eq!(
        failed.status(),
        502,
        "500 would make both clients give up for good"
    );
    assert_eq!(failed.text().await.unwrap(), "database down");
    h.upstream.answer_with(200, "saved");
    assert_eq!(file.upload(&h, 2).await.status(), 200);
    assert_eq!(h.upstream.received_at("/app/upload").len(), 2);
    assert_eq!(h.blob_count(), 0);
}

#[tokio::test]
async fn an_upstream_success_without_content_reaches_the_client_as_200() {
    let h = Harness::start().await;
    h.upstream.answer_with(204, "");
    let file = ChunkedFile::flow("nocontent.txt", random_bytes(1500, 24), 1000);
    let done = file.upload_all(&h).await;
    assert_eq!(
        done.status(),
        200,
        "Resumable.js retries a 204, Flow.js fails it"
    );
    assert_delivered_once(&h, &file);
    assert_eq!(file.upload(&h, 1).await.status(), 200, "the replay too");
}

#[tokio::test]
async fn the_same_file_sent_again_with_other_fields_is_a_new_upload() {
    let h = Harness::start().await;
    let mut file = ChunkedFile::resumable("report.pdf", random_bytes(2000, 25), 1000);
    file.extra = vec![("folder".into(), "a".into())];
    h.upstream.answer_with(201, "in a");
    assert_eq!(file.upload_all(&h).await.text().await.unwrap(), "in a");
    assert_eq!(
        file.upload(&h, 2).await.text().await.unwrap(),
        "in a",
        "same fields: replay"
    );

    file.extra = vec![("folder".into(), "b".into())];
    h.upstream.answer_with(201, "in b");
    assert_eq!(
        file.test(&h, 1).await.status(),
        204,
        "nothing stored for this one yet"
    );
    assert_eq!(file.upload_all(&h).await.text().await.unwrap(), "in b");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].field("folder"), Some("b"));
    assert_eq!(received[1].files[0].sha256, file.sha256());
}

#[tokio::test]
async fn an_upstream_refusing_before_reading_the_file_is_heard() {
    let h = Harness::start().await;
    h.upstream.refuse_early(413, "too big for us");
    let file = ChunkedFile::resumable("huge.bin", random_bytes(16 << 20, 28), 4 << 20);
    let refused = file.upload_all(&h).await;
    assert_eq!(refused.status(), 413);
    assert_eq!(refused.text().await.unwrap(), "too big for us");
    assert_eq!(h.blob_count(), 0, "a final refusal ends the upload");
    assert_eq!(
        file.upload(&h, 4).await.status(),
        413,
        "replayed, not sent again"
    );
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn an_upstream_claiming_success_before_it_had_the_file_is_not_believed() {
    let h = Harness::start().await;
    h.upstream.refuse_early(200, "sure");
    let file = ChunkedFile::flow("doubt.bin", random_bytes(16 << 20, 29), 4 << 20);
    let response = file.upload_all(&h).await;
    assert_eq!(response.status(), 502);
    assert_eq!(h.blob_count(), 4, "the parts stay for a retry");
}

#[tokio::test]
async fn a_retry_right_after_a_failed_delivery_waits_before_sending_the_file_again() {
    let h = Harness::with_routes(
        r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, retry_pause: 1s }
"#,
    )
    .await;
    h.upstream.answer_with(503, "busy");
    let file = ChunkedFile::resumable("pause.txt", random_bytes(2000, 30), 1000);
    assert_eq!(file.upload_all(&h).await.status(), 503);
    assert_eq!(file.upload(&h, 2).await.status(), 503);
    let attempts = h.upstream.received_at("/app/upload");
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts[1].at.duration_since(attempts[0].at) >= Duration::from_secs(1),
        "the second attempt reached the upstream retry_pause after the first"
    );
}

#[tokio::test]
async fn an_upstream_too_slow_to_answer_gets_504_and_the_parts_stay() {
    let h = Harness::with_routes(
        r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, timeout: 1s }
"#,
    )
    .await;
    h.upstream.delay_answers(Duration::from_secs(3));
    let file = ChunkedFile::resumable("slow.txt", random_bytes(2000, 31), 1000);
    assert_eq!(file.upload_all(&h).await.status(), 504);
    assert_eq!(h.blob_count(), 2, "the parts stay for a retry");
}

#[tokio::test]
async fn an_expired_session_keeps_the_parts_and_new_credentials_deliver() {
    let h = Harness::start().await;
    h.upstream.require_authorization("Bearer fresh");
    let mut file = ChunkedFile::resumable("long.bin", random_bytes(3000, 45), 1000);
    file.headers = vec![("authorization".into(), "Bearer stale".into())];
    let refused = file.upload_all(&h).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(h.blob_count(), 3, "a 401 keeps every part");

    let again = file.upload(&h, 3).await;
    assert_eq!(
        again.status(),
        401,
        "the same credentials get the same answer"
    );
    assert_eq!(again.text().await.unwrap(), "who are you?");
    assert_eq!(
        h.upstream.received_at("/app/upload").len(),
        1,
        "replayed, not sent again"
    );

    file.headers = vec![("authorization".into(), "Bearer fresh".into())];
    let delivered = file.upload(&h, 3).await;
    assert_eq!(delivered.status(), 200);
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].header("authorization"), Some("Bearer fresh"));
    assert_eq!(received[1].files[0].sha256, file.sha256());
    assert_eq!(h.blob_count(), 0);
}

#[tokio::test]
async fn every_forward_carries_an_idempotency_key_stable_for_the_same_delivery() {
    let h = Harness::start().await;
    h.upstream.answer_with(503, "busy");
    let file = ChunkedFile::flow("key.bin", random_bytes(2000, 46), 1000);
    file.upload_all(&h).await;
    h.upstream.answer_with(200, "ok");
    tokio::time::sleep(Duration::from_millis(2100)).await; // retry_pause
    assert_eq!(file.upload(&h, 2).await.status(), 200);
    let other = ChunkedFile::flow("other.bin", random_bytes(2000, 47), 1000);
    other.upload_all(&h).await;
    let keys: Vec<String> = h
        .upstream
        .received_at("/app/upload")
        .iter()
        .map(|r| r.header("idempotency-key").expect("a key").to_string())
        .collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        keys[0], keys[1],
        "a retry of the same delivery: the same key"
    );
    assert_ne!(keys[1], keys[2], "another file: another key");
    assert!(
        keys[0].starts_with('"') && keys[0].len() > 20,
        "{}",
        keys[0]
    );
}

#[tokio::test]
async fn a_stopped_server_has_let_go_of_its_storage_even_with_requests_in_flight() {
    let mut h = Harness::start().await;
    h.upstream.delay_answers(Duration::from_millis(300));
    for round in 0..40u64 {
        // Chunks being written and a delivery waiting for the upstream, cut by the stop.
        let file = ChunkedFile::resumable(
            &format!("inflight{round}.bin"),
            random_bytes(64 << 10, 200 + round),
            8 << 10,
        );
        file.upload(&h, 1).await;
        let in_flight: Vec<_> = (2..=file.count())
            .map(|n| {
                let (start, end) = file.bounds(n);
                let request = h
                    .client
                    .post(h.url(&format!("/upload?{}", file.query_string(n))))
                    .body(file.data.slice(start, end));
                tokio::spawn(request.send())
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(3 * (round % 20))).await;
        // Panics with "another Stitch process uses this storage directory" if the stopped
        // server still holds it.
        h.restart();
        for request in in_flight {
            let _ = request.await;
        }
    }
}

/// Parts held in memory, handed to the real forwarder in two pieces each; part `skewed.0`
/// holds `skewed.1` bytes more (or fewer) than its record says, as a file changed on disk
/// after its length was checked would.
struct SkewedParts {
    parts: Vec<bytes::Bytes>,
    skewed: Option<(u64, i64)>,
}

struct Pieces(std::collections::VecDeque<bytes::Bytes>);

#[async_trait::async_trait]
impl stitch::store::StoredBytes for Pieces {
    async fn next_piece(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        Ok(self.0.pop_front())
    }
}

#[async_trait::async_trait]
impl stitch::forward::PartReader for SkewedParts {
    async fn open(
        &self,
        part: &stitch::store::StoredPart,
    ) -> Result<stitch::store::StoredReader, stitch::store::StoreError> {
        let mut bytes = self.parts[part.number as usize - 1].clone();
        match self.skewed {
            Some((number, less)) if number == part.number && less < 0 => {
                bytes.truncate(bytes.len() - less.unsigned_abs() as usize);
            }
            Some((number, more)) if number == part.number => {
                let mut longer = bytes.to_vec();
                longer.extend(std::iter::repeat_n(b'x', more as usize));
                bytes = longer.into();
            }
            _ => {}
        }
        let half = bytes.len() / 2;
        Ok(Box::new(Pieces(
            [bytes.slice(..half), bytes.slice(half..)].into(),
        )))
    }
}

/// Forwards three parts through the real forwarder to a fresh upstream; returns what the
/// forward gave and the upstream.
async fn forward_skewed(skewed: Option<(u64, i64)>) -> (Result<u16, String>, Upstream) {
    use stitch::forward::{DeliveryRequest, Forward, HttpForwarder};
    use stitch::store::{StoredPart, UploadKey, UploadMeta};
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let forward = config(upstream.addr, dir.path(), "", ROUTES).routes[0]
        .forward
        .clone();
    let parts: Vec<bytes::Bytes> = (1..=3).map(|n| random_bytes(300_000, n)).collect();
    let file: Vec<StoredPart> = (1..=3)
        .map(|number| StoredPart {
            number,
            len: 300_000,
            digest: [number as u8; 32],
        })
        .collect();
    let meta = UploadMeta {
        length: Some(900_000),
        name: "skewed.bin".into(),
        media_type: None,
        protocol: serde_json::Value::Null,
        origin: None,
        carried: Vec::new(),
    };
    let request = DeliveryRequest {
        fields: Vec::new(),
        headers: Vec::new(),
        host: None,
        route: "test".into(),
    };
    let key = UploadKey::from_hex(&"ab".repeat(32)).unwrap();
    let sent = HttpForwarder::new(upstream.addr, Duration::from_secs(5))
        .send(
            &SkewedParts { parts, skewed },
            &key,
            &meta,
            &file,
            &forward,
            &request,
            "skewed",
        )
        .await;
    (
        sent.map(|answer| answer.status).map_err(|e| e.to_string()),
        upstream,
    )
}

#[tokio::test]
async fn a_part_that_reads_short_or_long_in_the_forward_fails_it_and_no_whole_request_reaches_the_upstream(
) {
    // As recorded: the upstream gets the whole file.
    let (sent, upstream) = forward_skewed(None).await;
    assert_eq!(sent, Ok(200));
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].whole());
    let whole: Vec<u8> = (1..=3)
        .flat_map(|n| random_bytes(300_000, n).to_vec())
        .collect();
    assert_eq!(
        received[0].files[0].sha256,
        hex::encode(Sha256::digest(&whole))
    );

    for (skew, says) in [
        (-1, "held 299999 bytes"),
        (1, "held more than 300000 bytes"),
    ] {
        let (sent, upstream) = forward_skewed(Some((2, skew))).await;
        let error = sent.expect_err("a part of the wrong length fails the forward");
        assert!(
            error.contains("stored part 2") && error.contains(says),
            "{error}"
        );
        // The request began (its head and part 1 went out), then broke off.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while upstream.heads() < 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            upstream.heads(),
            1,
            "the request's head reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            upstream.received().iter().all(|r| !r.whole()),
            "a request with a part of the wrong length was received whole"
        );
        assert!(
            upstream.body_bytes() < 900_000 + 1_000,
            "more than the file's bytes went out: {}",
            upstream.body_bytes()
        );
    }
}
