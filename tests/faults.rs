//! Faults a production proxy meets: a full or stalled disk, an application that stops reading
//! or cuts its answer short, a crash in the middle of a delivery. Most were found by fault
//! injection and fail on the code from before their fix; the tus ones found nothing to fix
//! and keep it so.

mod common;

use common::disk::SmallDisk;
use common::process::Recorder;
use common::relay::CuttingRelay;
use common::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_full_disk_refuses_chunks_with_503_damages_nothing_and_every_upload_completes_later() {
    let disk = SmallDisk::new(16);
    let dir = disk.dir("data");
    let h = Harness::custom("", ROUTES, None, Some(&dir)).await;
    let mut files = Vec::new();
    let mut refused = 0;
    // Leave less and less room, starting a new upload and continuing the earlier ones each time:
    // every request either succeeds or gets 503, and never leaves damaged state behind.
    for (i, free_kib) in [8u64, 6, 5, 4, 3, 2, 1, 0].into_iter().enumerate() {
        let file = ChunkedFile::resumable(
            &format!("f{i}.bin"),
            random_bytes(3000, 70 + i as u64),
            1000,
        );
        files.push(file);
        disk.leave_free(free_kib * 1024);
        for file in &files {
            for n in 1..file.count() {
                let status = file.upload(&h, n).await.status();
                assert!(
                    status == 200 || status == 503,
                    "{} chunk {n} with {free_kib} KiB free: {status}",
                    file.name
                );
                refused += usize::from(status == 503);
                let test = file.test(&h, n).await.status();
                assert!(
                    test == 200 || test == 204,
                    "test with {free_kib} KiB free: {test}"
                );
            }
        }
        assert_eq!(h.damage(), Vec::<String>::new(), "{free_kib} KiB free");
    }
    assert!(refused > 0, "the disk was full at times");
    disk.free();
    for file in &files {
        let done = file.upload_all(&h).await;
        assert_eq!(
            done.status(),
            200,
            "{} completes once space is back",
            file.name
        );
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), files.len(), "each file delivered once");
    for (file, request) in files.iter().zip(&received) {
        assert_eq!(request.files[0].sha256, file.sha256(), "{}", file.name);
    }
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn an_answer_that_cannot_be_written_down_is_replayed_and_recorded_once_space_returns() {
    let disk = SmallDisk::new(16);
    let dir = disk.dir("data");
    let mut h = Harness::custom("  result_ttl: 10s\n", ROUTES, None, Some(&dir)).await;
    let answer = format!(r#"{{"receipt":"{}"}}"#, "r".repeat(48 << 10));
    h.upstream.answer_with(201, &answer);
    let file = ChunkedFile::resumable("receipt.bin", random_bytes(3000, 80), 1000);
    file.upload(&h, 1).await;
    file.upload(&h, 2).await;
    // Room for the last chunk, not for the 48 KiB answer.
    disk.leave_free(12 << 10);
    let done = file.upload(&h, 3).await;
    assert_eq!(done.status(), 201);
    assert_eq!(done.text().await.unwrap(), answer);
    let retried = file.upload(&h, 3).await;
    assert_eq!(retried.status(), 201, "replayed while the disk is full");
    assert_eq!(retried.text().await.unwrap(), answer);
    assert_eq!(h.damage(), Vec::<String>::new());
    let answer_file = |h: &Harness| {
        let stored = h.stored_files();
        stored
            .iter()
            .find(|(p, _)| p.ends_with("/answer"))
            .map(|(_, len)| *len)
    };
    assert!(
        answer_file(&h).is_some_and(|len| len < 1024),
        "while the disk is full, the answer is written without its body"
    );

    disk.free();
    // The next request for the upload (or the sweep) writes the whole answer down.
    assert_eq!(file.upload(&h, 3).await.status(), 201);
    assert!(answer_file(&h).is_some_and(|len| len > 48 << 10));
    h.restart();
    let after_restart = file.upload(&h, 3).await;
    assert_eq!(
        after_restart.status(),
        201,
        "the answer survived the restart"
    );
    assert_eq!(after_restart.text().await.unwrap(), answer);
    assert_eq!(
        h.upstream.received_at("/app/upload").len(),
        1,
        "delivered once"
    );
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn an_application_that_stops_reading_gets_504_in_time_and_a_later_retry_delivers_once() {
    let app = Recorder::start(0.0);
    let routes = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, timeout: 5s, retry_pause: 1ms }
"#;
    let h = Harness::custom("", routes, Some(app.app.addr), None).await;
    // Larger than what the kernel buffers between the two processes. (The timeout leaves the
    // application, which reads and parses the whole file in Python, time to answer the retry
    // on a busy machine: a retry that sent the whole file and heard nothing in time would be
    // sent again, in doubt, and the application would get the file twice.)
    let file = ChunkedFile::resumable("stalled.bin", random_bytes(32 << 20, 81), 4 << 20);
    for n in 1..file.count() {
        assert_eq!(file.upload(&h, n).await.status(), 200);
    }
    app.app.signal("STOP");
    let started = Instant::now();
    let last = tokio::time::timeout(Duration::from_secs(60), file.upload(&h, file.count()))
        .await
        .expect("Stitch answers while the application is stopped");
    assert_eq!(last.status(), 504);
    let waited = started.elapsed();
    app.app.signal("CONT");
    assert!(
        waited < Duration::from_secs(20),
        "answered after {waited:?} with a 5 s timeout"
    );
    let retried = file.upload(&h, file.count()).await;
    assert_eq!(retried.status(), 201);
    let complete = app.complete();
    assert_eq!(complete.len(), 1, "delivered once: {complete:?}");
    assert_eq!(complete[0]["files"][0]["sha256"], file.sha256());
}

#[tokio::test]
async fn an_application_that_refuses_early_and_stops_reading_is_heard_not_timed_out() {
    // An application (or a proxy in front of it) that answers 413 as soon as it sees the
    // request's head, then keeps the connection open without reading the file: its answer
    // is the delivery's, not a 504 once the write times out.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let holding = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let answer = "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!";
                let _ = socket.write_all(answer.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let routes = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, timeout: 2s }
"#;
    let h = Harness::custom("", routes, Some(app), None).await;
    // Larger than what the kernel buffers between the two.
    let file = ChunkedFile::resumable("refused.bin", random_bytes(32 << 20, 82), 8 << 20);
    for n in 1..file.count() {
        assert_eq!(file.upload(&h, n).await.status(), 200);
    }
    let last = tokio::time::timeout(Duration::from_secs(30), file.upload(&h, file.count()))
        .await
        .expect("answered");
    assert_eq!(last.status(), 413);
    assert_eq!(last.text().await.unwrap(), "too big!");
    holding.abort();
}

#[tokio::test]
async fn an_answer_cut_after_its_status_line_still_counts_and_is_never_followed_by_a_second_delivery(
) {
    let upstream = Upstream::start().await;
    upstream.answer_with(201, &format!(r#"{{"id":"{}"}}"#, "9".repeat(4000)));
    // The status line and headers pass; the 4 KB body is cut after about 100 bytes.
    let relay = CuttingRelay::start(upstream.addr, 250).await;
    let h = Harness::custom("", ROUTES, Some(relay.addr), None).await;
    let file = ChunkedFile::flow("cut.bin", random_bytes(3000, 82), 1000);
    let done = file.upload_all(&h).await;
    assert_eq!(done.status(), 201, "the application decided: 201");
    let retried = file.upload(&h, 3).await;
    assert_eq!(retried.status(), 201, "replayed");
    assert_eq!(
        upstream.received_at("/app/upload").len(),
        1,
        "never delivered again"
    );
    assert_eq!(
        upstream.received_at("/app/upload")[0].files[0].sha256,
        file.sha256()
    );
}

#[tokio::test]
async fn readiness_turns_unready_on_a_full_disk_and_ready_when_space_returns() {
    let disk = SmallDisk::new(16);
    let dir = disk.dir("data");
    let metrics = free_addr();
    let routes = format!("metrics:\n  listen: {metrics}\n{ROUTES}");
    let _h = Harness::custom("", &routes, None, Some(&dir)).await;
    let ready = || async {
        let response = reqwest::get(format!("http://{metrics}/readyz"))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    disk.leave_free(0);
    let (status, why) = ready().await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("storage"), "{why}");
    disk.free();
    assert_eq!(ready().await.0, 200);
}

#[tokio::test]
async fn a_chunk_shared_past_the_file_systems_link_limit_is_stored_as_a_copy() {
    // ext4 allows 65,000 links to a file: a blob that many parts share (the same chunk in many
    // uploads: a run of zeros, say) cannot take one more, and the part becomes a copy.
    const EXT4_LINK_MAX: u64 = 65_000;
    let disk = SmallDisk::new(64);
    let dir = disk.dir("data");
    let h = Harness::custom("", ROUTES, None, Some(&dir)).await;
    let shared = random_bytes(1000, 90);
    let file_of = |name: &str, seed: u64| {
        let data = [&shared[..], &random_bytes(2000, seed)[..]].concat();
        ChunkedFile::resumable(name, data.into(), 1000)
    };
    let (first, second) = (file_of("a.bin", 91), file_of("b.bin", 92));
    assert_eq!(first.upload(&h, 1).await.status(), 200);
    let blobs: Vec<_> = h
        .stored_files()
        .into_iter()
        .filter(|(path, _)| path.starts_with("blobs/"))
        .collect();
    assert_eq!(blobs.len(), 1, "the first chunk's blob");
    let blob = dir.join(&blobs[0].0);
    // Other names for the blob, outside the store, up to the limit.
    let links = disk.dir("links");
    let nlink = || std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&blob).unwrap());
    for n in nlink()..EXT4_LINK_MAX {
        std::fs::hard_link(&blob, links.join(n.to_string())).unwrap();
    }
    assert!(
        std::fs::hard_link(&blob, links.join("one more")).is_err(),
        "the blob is at the link limit"
    );

    let done = second.upload_all(&h).await;
    assert_eq!(done.status(), 200, "the upload sharing the blob completes");
    assert_eq!(nlink(), EXT4_LINK_MAX, "its part is a copy, not a link");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].files[0].sha256, second.sha256());

    std::fs::remove_dir_all(&links).unwrap();
    for n in 2..=first.count() {
        assert_eq!(first.upload(&h, n).await.status(), 200);
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2, "each file delivered once");
    assert_eq!(received[1].files[0].sha256, first.sha256());
    assert_eq!(h.blob_count(), 0, "the blob went with its last part");
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn a_stalled_disk_holds_uploads_but_not_the_proxy_and_they_complete_once_it_moves() {
    // A file system that stops taking writes (frozen here; a hung disk or network volume
    // alike) while uploads are being stored: the chunks wait for it, but other traffic is
    // still served, the operators' endpoints answer (and say why Stitch is not ready), and
    // once it moves again every file arrives once, byte-exact.
    let disk = SmallDisk::new(64);
    let dir = disk.dir("data");
    let operators = free_addr();
    let routes = format!("metrics:\n  listen: {operators}\n{ROUTES}");
    let h = Harness::custom("", &routes, None, Some(&dir)).await;
    h.upstream.answer_with(200, "still here");
    let operators_get = |path: &str| {
        let request = h.client.get(format!("http://{operators}{path}")).send();
        async move {
            let response = tokio::time::timeout(Duration::from_secs(10), request)
                .await
                .unwrap_or_else(|_| panic!("no answer within 10 s"))
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let files: Vec<ChunkedFile> = (0..40)
        .map(|i| ChunkedFile::resumable(&format!("s{i}.bin"), random_bytes(40_000, 300 + i), 4_000))
        .collect();
    let uploads: Vec<_> = files
        .iter()
        .map(|file| {
            let (client, stitch) = (h.client.clone(), h.stitch_addr());
            let file = file.clone();
            tokio::spawn(async move {
                // Each chunk in turn, again after a failure, as the clients retry.
                let mut last = 0;
                for n in 1..=file.count() {
                    for _ in 0..100 {
                        last = match file.send_to(&client, stitch, n).await {
                            Ok(response) => response.status().as_u16(),
                            Err(_) => 0,
                        };
                        if last == 200 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                last
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let frozen = disk.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = operators_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage"), "{body}");
    let (status, body) = operators_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("stitch_parts_stored_total"), "{body}");
    // The listing answers too: what it could read (200), or that the store did not answer in
    // its time (503), never a request left waiting.
    let listing = tokio::time::timeout(
        Duration::from_secs(15),
        h.client.get(format!("http://{operators}/uploads")).send(),
    )
    .await
    .expect("the listing answers within 15 s")
    .unwrap();
    assert!(
        [200, 503].contains(&listing.status().as_u16()),
        "{}",
        listing.status()
    );
    let mut served = 0;
    for _ in 0..5 {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            h.client.get(h.url("/elsewhere")).send(),
        )
        .await;
        if let Ok(Ok(response)) = answer {
            served += usize::from(response.status() == 200);
        }
    }
    drop(frozen);
    assert_eq!(
        served, 5,
        "pass-through answered while the disk was stalled"
    );
    // Ready again once the write of the check that was held has gone through.
    let mut ready = (0, String::new());
    for _ in 0..50 {
        ready = operators_get("/readyz").await;
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "{}", ready.1);
    for upload in uploads {
        assert_eq!(upload.await.unwrap(), 200);
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), files.len(), "each file delivered once");
    for file in &files {
        let got: Vec<_> = received
            .iter()
            .filter(|r| r.files[0].file_name == file.name)
            .collect();
        assert_eq!(got.len(), 1, "{}", file.name);
        assert_eq!(got[0].files[0].sha256, file.sha256());
    }
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn tus_patches_on_a_full_disk_are_503_the_offset_stays_true_and_the_upload_resumes_later() {
    use common::tus::*;
    use reqwest::Method;
    let disk = SmallDisk::new(16);
    let dir = disk.dir("data");
    let h = Harness::custom("", TUS_ROUTE, None, Some(&dir)).await;
    let offset_of = |location: String| {
        let head = tus(&h, Method::HEAD, &location).send();
        async move {
            let response = head.await.unwrap();
            assert_eq!(response.status(), 200, "HEAD {location}");
            assert_eq!(header(&response, "cache-control"), Some("no-store"));
            header(&response, "upload-offset")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    let mut uploads = Vec::new();
    let mut refused = 0;
    // Less and less room: a new upload each time, and every upload so far sent its next
    // 64 KiB from the offset its HEAD reports, as a resuming client does.
    for (i, free_kib) in [512u64, 160, 96, 32, 0].into_iter().enumerate() {
        disk.leave_free(free_kib * 1024);
        let data = random_bytes(1 << 20, 90 + i as u64);
        let before = h.upload_files();
        let created = tus(&h, Method::POST, "/files")
            .header("upload-length", data.len().to_string())
            .send()
            .await
            .unwrap();
        match created.status().as_u16() {
            201 => uploads.push((location_of(&h, &created), data)),
            503 => {
                refused += 1;
                assert_eq!(h.upload_files(), before, "a refused creation left nothing");
            }
            other => panic!("creation with {free_kib} KiB free: {other}"),
        }
        for (location, data) in uploads.iter().cycle().take(3 * uploads.len()) {
            let before = offset_of(location.clone()).await;
            if before == data.len() as u64 {
                continue;
            }
            let end = (before + (64 << 10)).min(data.len() as u64);
            let sent = patch(
                &h,
                location,
                before,
                data.slice(before as usize..end as usize),
            )
            .await;
            let status = sent.status().as_u16();
            assert!(
                status == 204 || status == 503,
                "PATCH with {free_kib} KiB free: {status}"
            );
            let after = offset_of(location.clone()).await;
            match status {
                204 => assert_eq!(after, end, "a 204 stored the PATCH"),
                _ => {
                    refused += 1;
                    assert!(
                        (before..=end).contains(&after),
                        "after a 503 the offset is {after}, sent {before}..{end}"
                    );
                }
            }
        }
        assert_eq!(h.damage(), Vec::<String>::new(), "{free_kib} KiB free");
    }
    assert!(refused > 0, "the disk was full at times");
    assert!(!uploads.is_empty());
    disk.free();
    for (location, data) in &uploads {
        let at = offset_of(location.clone()).await;
        let rest = patch(&h, location, at, data.slice(at as usize..)).await;
        assert_eq!(
            rest.status(),
            204,
            "{location} completes once space is back"
        );
    }
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), uploads.len(), "each file delivered once");
    let mut sent: Vec<_> = uploads.iter().map(|(_, data)| sha256_hex(data)).collect();
    let mut got: Vec<_> = received.iter().map(|r| r.files[0].sha256.clone()).collect();
    sent.sort();
    got.sort();
    assert_eq!(got, sent, "byte-exact");
    assert_eq!(h.damage(), Vec::<String>::new());
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[tokio::test]
async fn a_tus_upload_completing_while_the_application_is_stopped_is_answered_in_time_and_delivered_once_it_wakes(
) {
    use common::tus::*;
    let app = Recorder::start(0.0);
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /app/upload, field: document, timeout: 6s, wait: 1s, retry_pause: 300ms }
"#;
    let h = Harness::custom("", routes, Some(app.app.addr), None).await;
    // Larger than what the kernel buffers between the two processes: an attempt cut by the
    // timeout never reaches the application whole. (The timeout leaves the application,
    // which reads and parses the whole file in Python, time to answer once it is woken:
    // an attempt that sent the whole file and heard nothing in time is sent again, in
    // doubt, with the same idempotency key.)
    let data = random_bytes(32 << 20, 91);
    let location = create_upload(&h, data.len()).await;
    let last = data.len() - (1 << 20);
    assert_eq!(
        patch(&h, &location, 0, data.slice(..last)).await.status(),
        204
    );
    app.app.signal("STOP");
    let started = Instant::now();
    let completing = tokio::time::timeout(
        Duration::from_secs(30),
        patch(&h, &location, last as u64, data.slice(last..)),
    )
    .await
    .expect("Stitch answers while the application is stopped");
    let waited = started.elapsed();
    assert_eq!(completing.status(), 204, "the bytes are stored");
    assert_eq!(
        header(&completing, "upload-offset"),
        Some(data.len().to_string().as_str())
    );
    let state = header(&completing, "stitch-delivery").map(str::to_string);
    assert!(
        matches!(state.as_deref(), Some("pending" | "retrying")),
        "{state:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?} with a 1 s wait"
    );
    let pending = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(pending.status(), 202, "no answer yet");
    // An attempt times out meanwhile.
    tokio::time::sleep(Duration::from_secs(8)).await;
    app.app.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let response = h.client.get(h.url(&location)).send().await.unwrap();
        if response.status() != 202 {
            break response;
        }
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status(), 201, "the application's answer");
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(body["files"][0]["sha256"], sha256_hex(&data));
    let complete = app.complete();
    assert_eq!(complete.len(), 1, "delivered once: {complete:?}");
    assert_eq!(complete[0]["files"][0]["sha256"], sha256_hex(&data));
    assert!(
        app.records().len() > 1,
        "attempts were cut while it was stopped"
    );
}

#[tokio::test]
async fn a_tus_patch_held_by_a_stalled_disk_leaves_head_and_other_traffic_answered() {
    use common::raw::RawConnection;
    use common::tus::*;
    use reqwest::Method;
    let disk = SmallDisk::new(64);
    let dir = disk.dir("data");
    let h = Harness::custom("", TUS_ROUTE, None, Some(&dir)).await;
    h.upstream.answer_with(200, "still here");
    let data = random_bytes(4 << 20, 92);
    let location = create_upload(&h, data.len()).await;
    let mut patching = RawConnection::open(h.stitch_addr()).await;
    let head_bytes = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n\
         Content-Length: {}\r\n\r\n",
        data.len()
    );
    assert!(patching.send(head_bytes.as_bytes()).await);
    assert!(patching.send(&data[..1 << 20]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = disk.freeze();
    // More of the body: its write to staging now waits for the disk.
    assert!(patching.send(&data[1 << 20..2 << 20]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client resumes (its connection seemed dead): HEAD asks the PATCH to stop and waits
    // a while for its bytes, then answers from what is stored.
    let head = tokio::time::timeout(
        Duration::from_secs(15),
        tus(&h, Method::HEAD, &location).send(),
    )
    .await
    .expect("HEAD answers while the disk is stalled")
    .unwrap();
    assert_eq!(head.status(), 200);
    let during: u64 = header(&head, "upload-offset").unwrap().parse().unwrap();
    assert!(during <= 2 << 20, "{during}");
    let passed = tokio::time::timeout(Duration::from_secs(10), h.client.get(h.url("/x")).send())
        .await
        .expect("pass-through answers while the disk is stalled")
        .unwrap();
    assert_eq!(passed.status(), 200);
    drop(frozen);
    // The stopped PATCH keeps what it had once the disk moves, and says so.
    let old = patching
        .response(Duration::from_secs(15))
        .await
        .expect("the stopped PATCH is answered once the disk moves");
    assert_eq!(old.status, 409, "taken over");
    let at: u64 = {
        let response = tus(&h, Method::HEAD, &location).send().await.unwrap();
        header(&response, "upload-offset").unwrap().parse().unwrap()
    };
    assert!((during..=2 << 20).contains(&at), "{during}..{at}");
    let rest = patch(&h, &location, at, data.slice(at as usize..)).await;
    assert_eq!(rest.status(), 204, "the rest completes the upload");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    assert_eq!(received[0].files[0].sha256, sha256_hex(&data));
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn a_final_tus_upload_refused_on_a_full_disk_leaves_nothing_behind_and_is_made_later() {
    use common::tus::*;
    use reqwest::Method;
    let disk = SmallDisk::new(16);
    let dir = disk.dir("data");
    let h = Harness::custom("", TUS_ROUTE, None, Some(&dir)).await;
    h.upstream.answer_with(201, "assembled");
    let data = random_bytes(192 << 10, 94);
    let mut urls = Vec::new();
    for piece in data.chunks(64 << 10) {
        let created = tus(&h, Method::POST, "/files")
            .header("upload-length", piece.len().to_string())
            .header("upload-concat", "partial")
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let location = location_of(&h, &created);
        let piece = bytes::Bytes::copy_from_slice(piece);
        assert_eq!(patch(&h, &location, 0, piece).await.status(), 204);
        urls.push(h.url(&location));
    }
    let finalize = |urls: &[String]| {
        tus(&h, Method::POST, "/files")
            .header("upload-concat", format!("final;{}", urls.join(" ")))
            // token "t-final"
            .header("upload-metadata", "filename Zi5iaW4=,token dC1maW5hbA==")
            .send()
    };
    // Less and less room: each final upload is made whole, or refused with nothing of it left.
    let mut made = None;
    for free_kib in [4u64, 2, 0] {
        disk.leave_free(free_kib << 10);
        let before = h.upload_files();
        let answer = finalize(&urls).await.unwrap();
        match answer.status().as_u16() {
            201 => {
                made = Some(location_of(&h, &answer));
                break;
            }
            503 => assert_eq!(h.upload_files(), before, "{free_kib} KiB free: a leftover"),
            other => panic!("{free_kib} KiB free: {other}"),
        }
        assert_eq!(h.damage(), Vec::<String>::new());
    }
    disk.free();
    if made.is_none() {
        let answer = finalize(&urls).await.unwrap();
        assert_eq!(answer.status(), 201, "made once space is back");
    }
    let finalized = h.client.put(h.url("/files/t-final")).send().await.unwrap();
    assert_eq!(finalized.status(), 201);
    assert_eq!(finalized.text().await.unwrap(), "assembled");
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    assert_eq!(received[0].files[0].sha256, sha256_hex(&data));
    assert_eq!(h.damage(), Vec::<String>::new());
}

#[tokio::test]
async fn a_tus_delivery_whose_answer_is_cut_counts_once_and_is_never_sent_again() {
    use common::tus::*;
    let upstream = Upstream::start().await;
    upstream.answer_with(201, &format!(r#"{{"id":"{}"}}"#, "7".repeat(4000)));
    // The status line and headers pass; the 4 KB body is cut after about 100 bytes.
    let relay = CuttingRelay::start(upstream.addr, 250).await;
    let h = Harness::custom("", TUS_ROUTE, Some(relay.addr), None).await;
    let data = random_bytes(300_000, 95);
    let location = create_upload(&h, data.len()).await;
    let done = patch(&h, &location, 0, data.clone()).await;
    assert_eq!(done.status(), 204);
    assert_eq!(header(&done, "stitch-upstream-status"), Some("201"));
    assert_eq!(header(&done, "stitch-delivery"), Some("delivered"));
    // The recorded answer is what arrived of it; HEAD and GET do not deliver it again.
    let answer = h.client.get(h.url(&location)).send().await.unwrap();
    assert_eq!(answer.status(), 201);
    let body = answer.text().await.unwrap();
    assert!(body.starts_with(r#"{"id":"777"#), "{body}");
    let head = tus(&h, reqwest::Method::HEAD, &location)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&head, "upload-offset"), Some("300000"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "never delivered again");
    assert_eq!(received[0].files[0].sha256, sha256_hex(&data));
}

#[tokio::test]
async fn an_authorization_hook_that_stops_answering_is_a_503_in_time_and_the_upload_starts_once_it_wakes(
) {
    use common::tus::*;
    let app = Recorder::start(0.0);
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    authorize: { path: /app/may-upload, timeout: 1s }
    forward: { path: /app/upload, field: document }
  - path: /upload
    protocol: resumable
    authorize: { path: /app/may-upload, timeout: 1s }
    forward: { path: /app/upload, field: document }
"#;
    let h = Harness::custom("", routes, Some(app.app.addr), None).await;
    app.app.signal("STOP");
    let started = Instant::now();
    let creation = tokio::time::timeout(
        Duration::from_secs(15),
        tus(&h, reqwest::Method::POST, "/files")
            .header("upload-length", "5")
            .send(),
    )
    .await
    .expect("answered while the hook is stopped")
    .unwrap();
    assert_eq!(creation.status(), 503, "retryable");
    assert!(header(&creation, "location").is_none());
    let file = ChunkedFile::resumable("c.bin", random_bytes(1000, 12), 1000);
    let chunk = tokio::time::timeout(Duration::from_secs(15), file.upload(&h, 1))
        .await
        .expect("answered while the hook is stopped");
    assert_eq!(chunk.status(), 503, "retryable");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "two requests with a 1 s hook timeout took {waited:?}"
    );
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");
    app.app.signal("CONT");
    // Once it answers again, both start and reach the application.
    let deadline = Instant::now() + Duration::from_secs(20);
    let location = loop {
        let response = tus(&h, reqwest::Method::POST, "/files")
            .header("upload-length", "5")
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            break location_of(&h, &response);
        }
        assert_eq!(response.status(), 503);
        assert!(Instant::now() < deadline, "never allowed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let done = patch(&h, &location, 0, bytes::Bytes::from_static(b"hello")).await;
    assert_eq!(done.status(), 204);
    assert_eq!(
        file.upload(&h, 1).await.status(),
        201,
        "the application's answer to the file"
    );
    let mut delivered: Vec<u64> = app
        .complete()
        .iter()
        .filter(|r| r["path"] == "/app/upload")
        .map(|r| r["files"][0]["size"].as_u64().unwrap())
        .collect();
    delivered.sort();
    assert_eq!(delivered, [5, 1000], "each file once");
}

#[tokio::test]
async fn an_authorization_hook_whose_answer_is_cut_is_still_its_word() {
    use common::tus::*;
    // The application decided: a refusal cut short is still a refusal (relayed as far as it
    // arrived), a 2xx cut short still lets the upload start.
    let upstream = Upstream::start().await;
    let reason = format!(r#"{{"error":"quota","detail":"{}"}}"#, "x".repeat(4000));
    upstream.answer_with(403, &reason);
    let relay = CuttingRelay::start(upstream.addr, 250).await;
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    authorize: { path: /app/may-upload }
    forward: { path: /app/upload, field: document }
"#;
    let h = Harness::custom("", routes, Some(relay.addr), None).await;
    let create = || {
        tus(&h, reqwest::Method::POST, "/files")
            .header("upload-length", "5")
            .send()
    };
    let refused = create().await.unwrap();
    assert_eq!(refused.status(), 403, "the application's refusal");
    let body = refused.text().await.unwrap_or_default();
    assert!(
        body.starts_with(r#"{"error":"quota""#) && body.len() < reason.len(),
        "{body}"
    );
    assert_eq!((h.upload_files(), h.blob_count()), (0, 0), "nothing stored");

    upstream.answer_with(
        200,
        &format!(r#"{{"ok":true,"pad":"{}"}}"#, "y".repeat(4000)),
    );
    let allowed = create().await.unwrap();
    assert_eq!(allowed.status(), 201, "allowed");
    let location = location_of(&h, &allowed);
    let done = patch(&h, &location, 0, bytes::Bytes::from_static(b"hello")).await;
    assert_eq!(done.status(), 204);
    let delivered = upstream.received_at("/app/upload");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].files[0].sha256, sha256_hex(b"hello"));
}

#[tokio::test]
async fn a_whole_file_tus_patch_that_fills_the_disk_keeps_its_whole_pieces_and_resumes_once_space_returns(
) {
    // tus-js-client's default: the whole file in one PATCH. The disk fills 50 MiB into a
    // 100 MiB body: the 32 MiB piece kept before stays, the one under way goes (nothing is left
    // of it in staging), and the client resumes from 32 MiB once there is room.
    use common::tus::*;
    let disk = SmallDisk::new(160);
    let dir = disk.dir("data");
    let h = Harness::custom("", TUS_ROUTE, None, Some(&dir)).await;
    let data = random_bytes(100 << 20, 96);
    let location = create_upload(&h, data.len()).await;
    disk.leave_free(50 << 20);
    // Answered 503 at once; the rest of the body is not read, so the request may also end
    // with the connection closed under it.
    let sent = h
        .client
        .patch(h.url(&location))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(data.clone())
        .send()
        .await;
    if let Ok(response) = &sent {
        assert_eq!(response.status(), 503, "the disk is full");
    }
    disk.free();
    resumes_from_its_first_piece(&h, &location, &data).await;
}

/// After a PATCH of `data` refused once its first 32 MiB piece was kept: HEAD says 32 MiB,
/// staging holds nothing, and the rest sent from there delivers the file once, byte-exact.
async fn resumes_from_its_first_piece(h: &Harness, location: &str, data: &bytes::Bytes) {
    use common::tus::*;
    let head = tus(h, reqwest::Method::HEAD, location)
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&head, "upload-offset"),
        Some("33554432"),
        "the first piece stays"
    );
    assert_eq!(h.damage(), Vec::<String>::new(), "nothing left in staging");
    let rest = patch(h, location, 32 << 20, data.slice(32 << 20..)).await;
    assert_eq!(rest.status(), 204);
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    assert_eq!(received[0].files[0].sha256, sha256_hex(data), "byte-exact");
}

#[tokio::test]
async fn a_tus_piece_that_cannot_be_kept_ends_its_patch_at_once_and_the_pieces_before_stay() {
    // A PATCH's 32 MiB pieces are each made durable and kept while the next one arrives.
    // Keeping one fails here (its parts directory made immutable, as a file system turned
    // read-only would): the PATCH is refused at once, not after the next piece has been read,
    // the pieces kept before stay, nothing is left in staging, and the client resumes.
    use common::tus::*;
    let disk = SmallDisk::new(400);
    let dir = disk.dir("data");
    let h = Harness::custom("", TUS_ROUTE, None, Some(&dir)).await;
    let data = random_bytes(100 << 20, 97);
    let location = create_upload(&h, data.len()).await;
    let first = patch(&h, &location, 0, data.slice(..32 << 20)).await;
    assert_eq!(first.status(), 204);
    let mut found = Vec::new();
    walk(&dir.join("uploads"), &mut found);
    let part = found
        .iter()
        .find(|(path, _)| path.contains("/parts/"))
        .map(|(path, _)| std::path::PathBuf::from(path))
        .expect("the first part");
    let parts_dir = part.parent().unwrap().to_path_buf();
    let chattr = |flag: &str| {
        let status = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&parts_dir)
            .status()
            .expect("chattr (Debian: e2fsprogs)");
        assert!(status.success(), "chattr {flag}");
    };
    chattr("+i");

    // The rest (68 MiB) at about 32 MiB/s: the second piece (32 to 64 MiB) cannot be kept
    // once it is whole and synced, a second in; the third would be whole a second later.
    let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rest = data.slice(32 << 20..);
    let counted = pulled.clone();
    let stream = futures::stream::unfold(0usize, move |at| {
        let (rest, counted) = (rest.clone(), counted.clone());
        async move {
            if at >= rest.len() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let end = (at + (1 << 20)).min(rest.len());
            counted.store(end, std::sync::atomic::Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(rest.slice(at..end)), end))
        }
    });
    let sent = h
        .client
        .patch(h.url(&location))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", (32u64 << 20).to_string())
        .header("content-length", (68u64 << 20).to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    let sent_when_answered = pulled.load(std::sync::atomic::Ordering::SeqCst);
    chattr("-i");
    if let Ok(response) = &sent {
        assert_eq!(response.status(), 503, "the part could not be kept");
    }
    assert!(
        sent_when_answered < 60 << 20,
        "answered once the piece failed, {} MiB into the body",
        sent_when_answered >> 20
    );
    resumes_from_its_first_piece(&h, &location, &data).await;
}
