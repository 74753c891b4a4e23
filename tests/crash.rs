//! kill -9 at any instant: after a restart, test requests report exactly the parts that were
//! fully published (a tus HEAD, at least the offset last acknowledged), and the upload
//! completes with the right bytes.

mod common;

use common::process::StitchProcess;
use common::*;
use std::time::Duration;

#[tokio::test]
async fn kill_9_during_uploads_loses_at_most_the_parts_in_flight() {
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let file = ChunkedFile::resumable("crash.bin", random_bytes(64 << 20, 60), 1 << 20);
    let client = reqwest::Client::new();
    // Chunks Stitch answered 200 for: each must still be reported after every crash.
    let acknowledged =
        std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));

    for (round, delay_ms) in [40u64, 90, 150, 220, 300].into_iter().enumerate() {
        let stitch = StitchProcess::start(upstream.addr, &dir, ROUTES);
        let addr = stitch.addr;
        let workers: Vec<_> = (0..3u64)
            .map(|worker| {
                let file = file.clone();
                let client = client.clone();
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    // Each worker walks the chunks from its own starting point. The last chunk
                    // is kept back so that the upload completes only after the last restart.
                    let parts = file.count() - 1;
                    for step in 0..parts {
                        let n = (step + worker * 16 + round as u64 * 5) % parts + 1;
                        let (start, end) = file.bounds(n);
                        let query = file.query_string(n);
                        let sent = client
                            .post(format!("http://{addr}/upload?{query}"))
                            .body(file.data.slice(start, end))
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status() == 200) {
                            acknowledged.lock().unwrap().insert(n);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        stitch.kill();
        for worker in workers {
            worker.abort();
        }
    }

    assert!(
        !acknowledged.lock().unwrap().is_empty(),
        "some chunks were acknowledged before the kills"
    );
    let stitch = StitchProcess::start(upstream.addr, &dir, ROUTES);
    let addr = stitch.addr;
    let mut survived = 0;
    for n in 1..=file.count() {
        let query = file.query_string(n);
        let url = format!("http://{addr}/upload?{query}");
        let test = client.get(&url).send().await.unwrap().status();
        if acknowledged.lock().unwrap().contains(&n) {
            assert_eq!(test, 200, "chunk {n} was acknowledged before a crash");
        }
        if test == 200 {
            survived += 1;
            continue;
        }
        assert_eq!(test, 204);
        let (start, end) = file.bounds(n);
        let response = client
            .post(&url)
            .body(file.data.slice(start, end))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "chunk {n}");
    }
    // What the killed processes were staging is gone; the live one stages in its own directory.
    let staged: Vec<_> = walk_files(&dir.join("tmp"))
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(staged.is_empty(), "no staging leftovers: {staged:?}");
    stitch.kill();
    assert!(survived > 0, "some parts were published before the kills");
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].files[0].sha256,
        file.sha256(),
        "every reported part was whole"
    );
}

#[tokio::test]
async fn two_processes_on_one_storage_directory_share_an_upload_and_deliver_it_once() {
    let upstream = Upstream::start().await;
    upstream.delay_answers(Duration::from_millis(200));
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let first = StitchProcess::start(upstream.addr, &dir, ROUTES);
    let second = StitchProcess::start_yaml(
        &dir.with_extension("second"),
        &config_yaml(upstream.addr, &dir, "", ROUTES),
    );
    let file = ChunkedFile::resumable("shared.bin", random_bytes(24 << 10, 62), 1024);
    let client = reqwest::Client::new();
    let send = |addr, n| file.send_to(&client, addr, n);
    // The chunks alternate between the two processes, three at a time, as a client of a
    // restart would; the last ones race to complete the upload in both.
    let mut statuses = Vec::new();
    for group in (1..=file.count()).collect::<Vec<_>>().chunks(3) {
        let sent = futures::future::join_all(group.iter().map(|&n| {
            let addr = if n % 2 == 0 { first.addr } else { second.addr };
            send(addr, n)
        }))
        .await;
        statuses.extend(sent.into_iter().map(|r| r.unwrap().status().as_u16()));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for addr in [first.addr, second.addr] {
        // Each process sees what the other stored: a test of any chunk of the delivered file
        // says "send it", and the re-sent bytes get the answer.
        let test = client
            .get(format!("http://{addr}/upload?{}", file.query_string(3)))
            .send()
            .await
            .unwrap();
        assert_eq!(test.status(), 204);
        assert_eq!(send(addr, 3).await.unwrap().status(), 200);
    }
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    assert_eq!(received[0].files[0].sha256, file.sha256());
}

#[tokio::test]
async fn a_delivery_cut_by_kill_9_is_sent_again_with_the_same_idempotency_key_and_logged_in_doubt()
{
    let upstream = Upstream::start().await;
    // The application takes the whole file, then is slow to answer: the in-doubt window.
    upstream.delay_answers(Duration::from_secs(30));
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let file = ChunkedFile::resumable("doubt.bin", random_bytes(3 << 20, 61), 1 << 20);
    let client = reqwest::Client::new();
    let send = |addr, n| file.send_to(&client, addr, n);
    let stitch = StitchProcess::start(upstream.addr, &dir, ROUTES);
    for n in 1..file.count() {
        assert_eq!(send(stitch.addr, n).await.unwrap().status(), 200);
    }
    let last = tokio::spawn({
        let (file, client, addr) = (file.clone(), client.clone(), stitch.addr);
        async move { file.send_to(&client, addr, file.count()).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while upstream.received_at("/app/upload").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the delivery never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stitch.kill();
    assert!(
        last.await.unwrap().is_err(),
        "the client lost its connection"
    );

    upstream.delay_answers(Duration::ZERO);
    let stitch = StitchProcess::start(upstream.addr, &dir, ROUTES);
    let retried = send(stitch.addr, file.count()).await.unwrap();
    assert_eq!(retried.status(), 200);
    let received = upstream.received_at("/app/upload");
    assert_eq!(
        received.len(),
        2,
        "delivered again: the answer was never recorded"
    );
    assert_eq!(received[1].files[0].sha256, file.sha256());
    let keys: Vec<_> = received
        .iter()
        .map(|r| r.header("idempotency-key"))
        .collect();
    assert!(keys[0].is_some());
    assert_eq!(
        keys[0], keys[1],
        "the application can tell it is the same delivery"
    );
    let log = stitch.log_text();
    assert!(
        log.contains("in doubt"),
        "the re-delivery is logged as in doubt:\n{log}"
    );
}

const EARLY_ROUTES: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /app/upload, field: document, early: true }
"#;

/// Waits up to 20 s for `ready`.
async fn until(what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kill_9_during_an_early_delivery_leaves_a_request_that_broke_off_and_the_file_arrives_once()
{
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let file = ChunkedFile::resumable("early-crash.bin", random_bytes(8 << 20, 62), 1 << 20);
    let client = reqwest::Client::new();
    let send = |addr, n| file.send_to(&client, addr, n);
    let stitch = StitchProcess::start(upstream.addr, &dir, EARLY_ROUTES);
    for n in 1..=5 {
        assert_eq!(send(stitch.addr, n).await.unwrap().status(), 200);
    }
    // The stored chunks are on their way to the application when Stitch dies.
    until("the early request upstream", || {
        upstream.body_bytes() >= 3 << 20
    })
    .await;
    stitch.kill();
    until("the broken request to end", || {
        !upstream.received_at("/app/upload").is_empty()
    })
    .await;
    let broken = upstream.received_at("/app/upload");
    assert!(
        !broken[0].whole(),
        "the application never had a whole request"
    );

    let stitch = StitchProcess::start(upstream.addr, &dir, EARLY_ROUTES);
    for n in 1..=5 {
        let test = client
            .get(format!(
                "http://{}/upload?{}",
                stitch.addr,
                file.query_string(n)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(test.status(), 200, "chunk {n} survived");
    }
    for n in 6..file.count() {
        assert_eq!(send(stitch.addr, n).await.unwrap().status(), 200);
    }
    let last = send(stitch.addr, file.count()).await.unwrap();
    assert_eq!(last.status(), 200);
    let whole: Vec<_> = upstream
        .received_at("/app/upload")
        .into_iter()
        .filter(Received::whole)
        .collect();
    assert_eq!(whole.len(), 1, "delivered once");
    assert_eq!(whole[0].files[0].sha256, file.sha256());
    assert_eq!(
        upstream.heads(),
        2,
        "the cut request, then one early delivery"
    );
}

#[tokio::test]
async fn an_early_delivery_in_doubt_after_kill_9_is_sent_again_with_the_same_idempotency_key() {
    let upstream = Upstream::start().await;
    upstream.delay_answers(Duration::from_secs(30));
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let file = ChunkedFile::resumable("early-doubt.bin", random_bytes(3 << 20, 63), 1 << 20);
    let client = reqwest::Client::new();
    let send = |addr, n| file.send_to(&client, addr, n);
    let stitch = StitchProcess::start(upstream.addr, &dir, EARLY_ROUTES);
    for n in 1..file.count() {
        assert_eq!(send(stitch.addr, n).await.unwrap().status(), 200);
    }
    let last = tokio::spawn({
        let (file, client, addr) = (file.clone(), client.clone(), stitch.addr);
        async move { file.send_to(&client, addr, file.count()).await }
    });
    // The request begun early is finished and whole at the application, whose answer is slow.
    until("the whole delivery upstream", || {
        !upstream.received_at("/app/upload").is_empty()
    })
    .await;
    assert!(upstream.received_at("/app/upload")[0].whole());
    assert_eq!(
        upstream.heads(),
        1,
        "the request begun early was the delivery"
    );
    stitch.kill();
    assert!(
        last.await.unwrap().is_err(),
        "the client lost its connection"
    );

    upstream.delay_answers(Duration::ZERO);
    let stitch = StitchProcess::start(upstream.addr, &dir, EARLY_ROUTES);
    assert_eq!(send(stitch.addr, file.count()).await.unwrap().status(), 200);
    let received = upstream.received_at("/app/upload");
    assert_eq!(
        received.len(),
        2,
        "delivered again: the answer was never recorded"
    );
    assert!(received.iter().all(Received::whole));
    assert_eq!(received[1].files[0].sha256, file.sha256());
    assert_eq!(
        received[0].header("idempotency-key"),
        received[1].header("idempotency-key"),
        "the application can tell it is the same delivery"
    );
    assert!(stitch.log_text().contains("in doubt"));
}

/// Every regular file under `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            found.extend(walk_files(&entry.path()));
        } else {
            found.push(entry.path());
        }
    }
    found
}

#[tokio::test]
async fn kill_9_during_tus_patches_keeps_every_acknowledged_offset_and_the_file_arrives_once() {
    // A tus client PATCHing 1 MiB at a time (bodies of several pieces), Stitch killed at five
    // instants and started again: HEAD never reports less than the last offset a PATCH was
    // answered with, never more than was sent, and the file completes byte-exact, once.
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let data = random_bytes(48 << 20, 61);
    // No connection kept: each process killed leaves its connections dead.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tus = |method: reqwest::Method, url: String| {
        client.request(method, url).header("tus-resumable", "1.0.0")
    };
    let mut stitch = StitchProcess::start(upstream.addr, &dir, common::tus::TUS_ROUTE);
    let created = tus(
        reqwest::Method::POST,
        format!("http://{}/files", stitch.addr),
    )
    .header("upload-length", data.len().to_string())
    .send()
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_string();
    let path = location[location.find("/files").unwrap()..].to_string();
    let head_offset = |addr: std::net::SocketAddr| {
        let head = tus(reqwest::Method::HEAD, format!("http://{addr}{path}")).send();
        async move {
            let response = head.await.unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["upload-offset"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    let mut acknowledged = 0u64;
    // Each round is killed after its `after`-th answer, `pause_us` into the PATCH after it
    // (what the body reached by then varies), whatever this machine's speed.
    for (after, pause_us) in [(2usize, 300u64), (3, 1500), (1, 700), (4, 2500), (2, 100)] {
        let addr = stitch.addr;
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sender = {
            let (data, path, client) = (data.clone(), path.clone(), client.clone());
            let progress = progress.clone();
            tokio::spawn(async move {
                // The offsets answered 204, in order, until the process dies.
                let mut answered = Vec::new();
                let Ok(head) = client
                    .head(format!("http://{addr}{path}"))
                    .header("tus-resumable", "1.0.0")
                    .send()
                    .await
                else {
                    return answered;
                };
                let mut at: u64 = head.headers()["upload-offset"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // The last MiB is kept back: the file completes after the last restart.
                while at < data.len() as u64 - (1 << 20) {
                    let end = (at + (1 << 20)).min(data.len() as u64 - (1 << 20));
                    let sent = client
                        .patch(format!("http://{addr}{path}"))
                        .header("tus-resumable", "1.0.0")
                        .header("content-type", "application/offset+octet-stream")
                        .header("upload-offset", at.to_string())
                        .body(data.slice(at as usize..end as usize))
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == 204 => {
                            at = response.headers()["upload-offset"]
                                .to_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            answered.push(at);
                            progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        _ => break,
                    }
                }
                answered
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while progress.load(std::sync::atomic::Ordering::SeqCst) < after {
            assert!(std::time::Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_micros(pause_us)).await;
        stitch.kill();
        let answered = sender.await.unwrap();
        if let Some(last) = answered.last() {
            acknowledged = acknowledged.max(*last);
        }
        stitch = StitchProcess::start_again(addr, &dir);
        let offset = head_offset(stitch.addr).await;
        assert!(
            offset >= acknowledged,
            "HEAD says {offset} after a crash; {acknowledged} was acknowledged"
        );
        assert!(offset <= data.len() as u64 - (1 << 20), "{offset}");
        acknowledged = offset;
    }
    assert!(
        acknowledged > 0,
        "some PATCHes were answered between the kills"
    );
    let at = head_offset(stitch.addr).await;
    let rest = tus(
        reqwest::Method::PATCH,
        format!("http://{}{path}", stitch.addr),
    )
    .header("content-type", "application/offset+octet-stream")
    .header("upload-offset", at.to_string())
    .body(data.slice(at as usize..))
    .send()
    .await
    .unwrap();
    assert_eq!(rest.status(), 204);
    let received = upstream.received_at("/app/upload");
    assert_eq!(received.len(), 1, "delivered once");
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    assert_eq!(
        received[0].files[0].sha256, sha,
        "every kept byte was right"
    );
    stitch.kill();
}

#[tokio::test]
async fn kill_9_during_a_whole_file_patch_keeps_every_whole_piece_of_it() {
    // tus-js-client and Uppy send a whole file in one PATCH by default. A crash 70 MiB into
    // it keeps the 32 MiB pieces that were whole: the client resumes from 64 MiB, not from 0.
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let data = random_bytes(100 << 20, 63);
    let stitch = StitchProcess::start(upstream.addr, &dir, common::tus::TUS_ROUTE);
    let addr = stitch.addr;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let path = common::tus::create_at(addr, data.len()).await;
    let mut patch = common::raw::RawConnection::open(addr).await;
    let head = common::tus::patch_head(&path, 0, data.len());
    assert!(patch.send(head.as_bytes()).await);
    assert!(patch.send(&data[..70 << 20]).await);
    // Once the second piece is kept (the third is under way: lost).
    let parts = || {
        let mut found = Vec::new();
        walk(&dir.join("uploads"), &mut found);
        found.iter().filter(|(p, _)| p.contains("/parts/")).count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while parts() < 2 {
        assert!(std::time::Instant::now() < deadline, "{} parts", parts());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stitch.kill();
    drop(patch);

    let stitch = StitchProcess::start_again(addr, &dir);
    let url = format!("http://{addr}{path}");
    let progress = client
        .head(&url)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(progress.status(), 200);
    let offset: usize = progress.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(offset, 64 << 20, "the whole pieces are kept");
    let rest = common::tus::patch_at(addr, &path, offset, data.slice(offset..)).await;
    assert_eq!(rest.status(), 204);
    common::tus::assert_delivered_once(&upstream, &data);
    stitch.kill();
}

#[tokio::test]
async fn a_patch_in_another_process_on_the_same_storage_takes_over_from_a_quiet_one() {
    // Two processes share one storage directory (behind one load balancer). A client's
    // connection to the first goes quiet; it resumes through the second, which asks the first
    // (through the storage) to stop reading: at once, not after the body timeout (60 s).
    let root = tempfile::tempdir().unwrap();
    a_quiet_patch_is_taken_over_through(&root.path().join("data")).await;
}

#[tokio::test]
async fn a_take_over_within_the_same_second_works_on_a_file_system_with_times_to_the_second() {
    // The same, on a file system that keeps file times to the second, with the second
    // process's PATCH arriving within the second of the first's: a request to stop stamped by
    // a file time would read as older than the PATCH it must stop.
    let disk = common::disk::SmallDisk::with_times_to_the_second(64);
    a_quiet_patch_is_taken_over_through(&disk.mount.join("data")).await;
}

/// A PATCH to the first of two processes on `dir` goes quiet at the start of a second; a PATCH
/// to the second, 300 ms later, takes over from it and the file arrives once.
async fn a_quiet_patch_is_taken_over_through(dir: &std::path::Path) {
    let upstream = Upstream::start().await;
    std::fs::create_dir(dir).unwrap();
    let (first, second) = two_tus_processes(upstream.addr, dir);
    let data = random_bytes(200_000, 64);
    let path = common::tus::create_at(first.addr, data.len()).await;
    let mut quiet = common::raw::RawConnection::open(first.addr).await;
    let head = common::tus::patch_head(&path, 0, data.len());
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    tokio::time::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into_second))).await;
    assert!(quiet.send(head.as_bytes()).await);
    assert!(quiet.send(&data[..50_000]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let patch =
        |offset: usize| common::tus::patch_at(second.addr, &path, offset, data.slice(offset..));
    let retried = tokio::time::timeout(Duration::from_secs(10), patch(0))
        .await
        .expect("the other process's quiet PATCH does not hold this one up");
    assert_eq!(retried.status(), 409, "the offset moved");
    assert_eq!(retried.headers()["upload-offset"], "50000");
    let old = quiet.response(Duration::from_secs(5)).await;
    assert_eq!(
        old.map(|a| a.status),
        Some(409),
        "the quiet one was taken over"
    );
    let rest = patch(50_000).await;
    assert_eq!(rest.status(), 204);
    common::tus::assert_delivered_once(&upstream, &data);
}

#[tokio::test]
async fn a_patch_that_asked_another_process_to_stop_is_not_stopped_by_its_own_request() {
    // The first process holds the upload with a quiet PATCH that sent nothing yet; the
    // second's PATCH asks it to stop, finds the offset unchanged and goes on, slowly (2 s of
    // body): its own request to stop must not stop it.
    let upstream = Upstream::start().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let (first, second) = two_tus_processes(upstream.addr, &dir);
    let line = common::relay::SlowLine::start(second.addr, 100_000).await;
    let data = random_bytes(200_000, 65);
    let path = common::tus::create_at(first.addr, data.len()).await;
    let mut quiet = common::raw::RawConnection::open(first.addr).await;
    let head = common::tus::patch_head(&path, 0, data.len());
    assert!(quiet.send(head.as_bytes()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let whole = tokio::time::timeout(
        Duration::from_secs(20),
        common::tus::patch_at(line.addr, &path, 0, data.clone()),
    )
    .await
    .expect("answered");
    assert_eq!(
        whole.status(),
        204,
        "the whole file, through the second process"
    );
    let old = quiet.response(Duration::from_secs(5)).await;
    assert_eq!(
        old.map(|a| a.status),
        Some(409),
        "the quiet one was taken over"
    );
    common::tus::assert_delivered_once(&upstream, &data);
}

/// Two Stitch processes with the tus route on one storage directory, each on its own port.
fn two_tus_processes(
    upstream: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (StitchProcess, StitchProcess) {
    let first = StitchProcess::start(upstream, dir, common::tus::TUS_ROUTE);
    let second = StitchProcess::start_yaml(
        &dir.with_extension("second"),
        &config_yaml(upstream, dir, "", common::tus::TUS_ROUTE),
    );
    (first, second)
}

/// A small deterministic generator for the choices of a test that must not depend on luck.
struct Choices(u64);

impl Choices {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Sends one file the way both clients do (each chunk tested, and sent if missing, in order),
/// to one of `addrs` at random, riding out refused connections and errors; then sends the last
/// chunk again until the application's answer comes back (a `201`).
async fn send_through_crashes(
    client: &reqwest::Client,
    addrs: [std::net::SocketAddr; 2],
    file: &ChunkedFile,
    choices: &mut Choices,
    deadline: tokio::time::Instant,
) {
    let mut answered = false;
    let mut n = 1;
    while n <= file.count() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: stuck",
            file.name
        );
        let addr = addrs[choices.below(2) as usize];
        let url = format!("http://{addr}/upload?{}", file.query_string(n));
        let tested = client.get(&url).send().await.map(|r| r.status().as_u16());
        let sent = match tested {
            Ok(204) => file
                .send_to(client, addr, n)
                .await
                .map(|r| r.status().as_u16()),
            other => other,
        };
        match sent {
            Ok(200) => n += 1,
            Ok(201) => {
                answered = true;
                n += 1;
            }
            // A refused connection, a crash mid-request, a 5xx while the other process holds
            // the upload: sent again, as the clients' retries do.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    while !answered {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: no answer",
            file.name
        );
        let addr = addrs[choices.below(2) as usize];
        match file.send_to(client, addr, file.count()).await {
            Ok(r) if r.status() == 201 => answered = true,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Files sent, then sent again with other bytes under the same default identifier (the same
/// name and size), through two processes sharing one storage directory while one or the other
/// is killed at random instants and started again. A chunk whose answer a crash lost is sent
/// again after its file was delivered; the next file of that name must not take it for its
/// own. The application receives only files the clients sent, each whole, and every one.
#[tokio::test]
async fn kill_9_amid_files_sent_again_under_one_identifier_never_splices_them() {
    const CHAOS: Duration = Duration::from_secs(12);
    let upstream = Upstream::start().await;
    upstream.answer_with(201, "kept");
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let names = [root.path().join("a"), root.path().join("b")];
    let processes: Vec<_> = names
        .iter()
        .map(|name| StitchProcess::start_yaml(name, &config_yaml(upstream.addr, &data, "", ROUTES)))
        .collect();
    let addrs = [processes[0].addr, processes[1].addr];
    let processes = std::sync::Arc::new(std::sync::Mutex::new(
        processes.into_iter().map(Some).collect::<Vec<_>>(),
    ));
    let chaos_ends = std::time::Instant::now() + CHAOS;
    let killer = {
        let processes = processes.clone();
        std::thread::spawn(move || {
            let mut choices = Choices(7);
            let mut kills = 0;
            while std::time::Instant::now() < chaos_ends {
                std::thread::sleep(Duration::from_millis(150 + choices.below(450)));
                let i = choices.below(2) as usize;
                let victim = processes.lock().unwrap()[i].take().unwrap();
                victim.kill();
                kills += 1;
                std::thread::sleep(Duration::from_millis(20 + choices.below(130)));
                let again = StitchProcess::start_again(addrs[i], &names[i]);
                processes.lock().unwrap()[i] = Some(again);
            }
            kills
        })
    };

    let deadline = tokio::time::Instant::now() + CHAOS + Duration::from_secs(60);
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut choices = Choices(100 + worker);
                let mut sent = Vec::new();
                let mut f = 0;
                while std::time::Instant::now() < chaos_ends {
                    let name = format!("w{worker}-{f}.bin");
                    let chunk = 64 << 10;
                    let len = (1 + choices.below(4)) * chunk + choices.below(chunk);
                    let first = random_bytes(len as usize, worker << 32 | f << 1);
                    let mut files = vec![first.clone()];
                    match f % 3 {
                        // Sent again whole with other bytes...
                        0 => files.push(random_bytes(len as usize, worker << 32 | f << 1 | 1)),
                        // ...or with its last chunk edited: the rest matches the delivered file.
                        1 => {
                            let mut edited = first.to_vec();
                            let last = edited.len() - 1;
                            edited[last] ^= 0xff;
                            files.push(edited.into());
                        }
                        _ => {}
                    }
                    for bytes in files {
                        let file = ChunkedFile::resumable(&name, bytes, chunk);
                        send_through_crashes(&client, addrs, &file, &mut choices, deadline).await;
                        sent.push((name.clone(), file.sha256()));
                    }
                    f += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = Vec::new();
    for worker in workers {
        sent.extend(worker.await.unwrap());
    }
    let kills = killer.join().unwrap();
    // Whole requests only: a delivery that a kill cut off arrives in part.
    let received: Vec<(String, String)> = upstream
        .received_at("/app/upload")
        .into_iter()
        .filter(|r| r.whole())
        .map(|r| (r.files[0].file_name.clone(), r.files[0].sha256.clone()))
        .collect();
    for file in &received {
        assert!(
            sent.contains(file),
            "the application got a file nobody sent: {file:?}"
        );
    }
    for file in &sent {
        assert!(received.contains(file), "never delivered: {file:?}");
    }
    assert!(kills >= 10, "{kills} kills");
    assert!(sent.len() >= 20, "{} files sent", sent.len());
}
