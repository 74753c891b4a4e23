//! The upload core's behaviour, the same for every storage engine: each test below runs once on
//! the local-disk engine and once on the in-memory one, against a stand-in forwarder (no
//! sockets) and a clock the test moves (no sleeps; retry pauses run on Tokio's paused clock).

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use stitch::config::{FieldPolicy, ForwardConfig};
use stitch::drain::InFlight;
use stitch::forward::{DeliveryRequest, Forward, ForwardError, PartReader};
use stitch::store::{
    BodyError, BodySource, Digest, Engines, Fence, PartIndex, QueuedDelivery, RecordedAnswer,
    StateStore, StoreError, StoredPart, StoredReader, UploadKey, UploadMeta,
};
use stitch::upload::{
    Clock, CoreError, Delivery, FieldsDigest, Outcome, PartRef, PartStatus, Ttls, UploadCore,
};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Engine {
    Fs,
    Memory,
}

/// A clock that moves only when told to.
struct ManualClock(Mutex<SystemTime>);

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// Stands in for the upstream: reads the whole file from the store (so a missing or damaged
/// part shows), records its SHA-256, answers `status`, and waits for `gate` first if set.
struct StandIn {
    calls: AtomicUsize,
    received: Mutex<Vec<(String, String)>>,
    status: Mutex<u16>,
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    entered: tokio::sync::Notify,
    at: Mutex<Vec<tokio::time::Instant>>,
}

#[async_trait]
impl Forward for StandIn {
    async fn send(
        &self,
        parts: &dyn PartReader,
        _upload: &UploadKey,
        _meta: &UploadMeta,
        file: &[StoredPart],
        _forward: &ForwardConfig,
        _request: &DeliveryRequest,
        idempotency_key: &str,
    ) -> Result<RecordedAnswer, ForwardError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.at.lock().unwrap().push(tokio::time::Instant::now());
        self.entered.notify_waiters();
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            let _ = gate.acquire().await.unwrap();
        }
        let mut hasher = Sha256::new();
        for part in file {
            let mut reader = parts.open(part).await?;
            while let Some(piece) = reader.next_piece().await.map_err(StoreError::Io)? {
                hasher.update(&piece);
            }
        }
        let sha = hex::encode(hasher.finalize());
        self.received
            .lock()
            .unwrap()
            .push((sha.clone(), idempotency_key.to_string()));
        Ok(RecordedAnswer {
            status: *self.status.lock().unwrap(),
            headers: Vec::new(),
            fields: String::new(),
            file: None,
            refused_for: None,
            body: Bytes::from(format!("received {sha}")),
        })
    }
}

/// A core on one engine, with the stand-in upstream and the manual clock.
struct Setup {
    core: Arc<UploadCore>,
    upstream: Arc<StandIn>,
    clock: Arc<ManualClock>,
    engines: Engines,
    memory: Option<Arc<stitch::store::memory::Memory>>,
    _dir: tempfile::TempDir,
}

const TTLS: Ttls = Ttls {
    upload: Duration::from_secs(3600),
    result: Duration::from_secs(600),
};

impl Setup {
    fn new(engine: Engine) -> Setup {
        Setup::in_dir(engine, tempfile::tempdir().unwrap())
    }

    /// A new core and engine on this one's directory: what a restarted Stitch sees.
    fn reopened(self) -> Setup {
        Setup::in_dir(Engine::Fs, self._dir)
    }

    fn in_dir(engine: Engine, dir: tempfile::TempDir) -> Setup {
        let (engines, memory) = match engine {
            Engine::Fs => (
                stitch::store::fs::open(dir.path(), true, Duration::from_secs(60)).unwrap(),
                None,
            ),
            Engine::Memory => {
                let (engines, memory) = stitch::store::memory::open_with_handle();
                (engines, Some(memory))
            }
        };
        let upstream = Arc::new(StandIn {
            calls: AtomicUsize::new(0),
            received: Mutex::default(),
            status: Mutex::new(201),
            gate: Mutex::new(None),
            entered: tokio::sync::Notify::new(),
            at: Mutex::default(),
        });
        let clock = Arc::new(ManualClock(Mutex::new(SystemTime::now())));
        let core = Arc::new(UploadCore::new(
            engines.clone(),
            upstream.clone(),
            clock.clone(),
            TTLS,
            InFlight::default(),
        ));
        Setup {
            core,
            upstream,
            clock,
            engines,
            memory,
            _dir: dir,
        }
    }

    fn advance(&self, by: Duration) {
        *self.clock.0.lock().unwrap() += by;
    }

    fn calls(&self) -> usize {
        self.upstream.calls.load(Ordering::SeqCst)
    }
}

/// A three-part file of 3000 bytes, as a chunk protocol declares it.
struct File {
    key: UploadKey,
    meta: UploadMeta,
    data: Vec<u8>,
}

impl File {
    fn new(name: &str, seed: u8) -> File {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 ^ seed).collect();
        File {
            key: UploadKey::derive(&[name.as_bytes()]),
            meta: UploadMeta {
                length: Some(3000),
                name: name.to_string(),
                media_type: None,
                protocol: serde_json::json!({ "chunk_size": 1000 }),
                origin: None,
                carried: Vec::new(),
            },
            data,
        }
    }

    fn part(&self, number: u64) -> (PartRef, Vec<u8>) {
        let start = (number as usize - 1) * 1000;
        let bytes = self.data[start..start + 1000].to_vec();
        (PartRef { number, len: 1000 }, bytes)
    }

    fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }
}

/// A request body: pieces, then the end (or an error).
struct Body(Vec<Bytes>, Option<BodyError>);

impl Body {
    fn of(bytes: Vec<u8>) -> Body {
        Body(vec![Bytes::from(bytes)], None)
    }
}

#[async_trait]
impl BodySource for Body {
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BodyError> {
        if !self.0.is_empty() {
            return Ok(Some(self.0.remove(0)));
        }
        match self.1.take() {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

fn fields(value: &str) -> Vec<(String, String)> {
    vec![("folder".to_string(), value.to_string())]
}

fn forward() -> ForwardConfig {
    ForwardConfig {
        path: "/upload".into(),
        field: "file".into(),
        fields: FieldPolicy::Only(vec!["folder".into()]),
        headers: Vec::new(),
        protocol_fields: false,
        timeout: Duration::from_secs(30),
        retry_pause: Duration::from_secs(2),
        wait: Duration::from_secs(30),
        early: None,
    }
}

fn request(folder: &str) -> DeliveryRequest {
    DeliveryRequest {
        fields: fields(folder),
        ..Default::default()
    }
}

async fn put(t: &Setup, file: &File, number: u64, folder: &str) -> PartStatus {
    let (part, bytes) = file.part(number);
    let digest = FieldsDigest::of(&fields(folder));
    t.core
        .put_part(&file.key, &file.meta, part, &mut Body::of(bytes), &digest)
        .await
        .unwrap()
}

/// Stores parts 1 and 2 and returns; part 3 completes the file.
async fn store_all_but_last(t: &Setup, file: &File) {
    for n in 1..=2 {
        assert!(matches!(
            put(t, file, n, "a").await,
            PartStatus::Stored { complete: false }
        ));
    }
}

/// Sends part 3, which completes the file, then delivers it as a request from `folder` would.
async fn complete_and_deliver(t: &Setup, file: &File, folder: &str) -> Arc<Delivery> {
    assert!(matches!(
        put(t, file, 3, folder).await,
        PartStatus::Stored { complete: true }
    ));
    let delivery = t
        .core
        .deliver(file.key, &forward(), request(folder), Instant::now())
        .await;
    // The answer comes before the parts are removed.
    assert!(t.core.cleanups().idle(Duration::from_secs(10)).await);
    delivery
}

/// The blobs stored, once no delivered upload's parts are still being removed.
async fn stored_blobs(t: &Setup) -> Vec<stitch::store::Digest> {
    assert!(t.core.cleanups().idle(Duration::from_secs(10)).await);
    t.engines.blobs.digests().await.unwrap()
}

fn answer(outcome: &Outcome) -> &RecordedAnswer {
    match outcome {
        Outcome::Answered { answer, .. } => answer,
        other => panic!("no answer: {other:?}"),
    }
}

async fn parts_are_stored_once_and_complete_the_file(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("once.bin", 1);
    store_all_but_last(&t, &file).await;
    assert!(matches!(
        put(&t, &file, 2, "a").await,
        PartStatus::Stored { complete: false }
    ));
    let delivery = complete_and_deliver(&t, &file, "a").await;
    assert_eq!(answer(&delivery.outcome).status, 201);
    let received = t.upstream.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].0, file.sha256(), "the parts in order, whole");
    assert!(stored_blobs(&t).await.is_empty(), "blobs released");
}

async fn a_part_that_contradicts_the_first_is_refused_and_changes_nothing(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("pinned.bin", 2);
    put(&t, &file, 1, "a").await;
    let mut other = File::new("pinned.bin", 2);
    other.meta.protocol = serde_json::json!({ "chunk_size": 999 });
    let (part, bytes) = other.part(2);
    let refused = t
        .core
        .put_part(
            &other.key,
            &other.meta,
            part,
            &mut Body::of(bytes),
            &FieldsDigest::of(&fields("a")),
        )
        .await;
    assert!(matches!(refused, Err(CoreError::Conflict { .. })));
    assert_eq!(t.engines.state.parts(&file.key).await.unwrap().len(), 1);
    assert_eq!(stored_blobs(&t).await.len(), 1);
}

async fn a_body_shorter_than_declared_is_refused_and_stores_nothing(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("short.bin", 3);
    let (part, bytes) = file.part(1);
    let broken = Body(
        vec![Bytes::from(bytes[..400].to_vec())],
        Some(BodyError::Broken("reset".into())),
    );
    let mut broken = broken;
    let refused = t
        .core
        .put_part(
            &file.key,
            &file.meta,
            part,
            &mut broken,
            &FieldsDigest::of(&fields("a")),
        )
        .await;
    assert!(matches!(
        refused,
        Err(CoreError::Short {
            received: 400,
            broke_off: Some(_),
            ..
        })
    ));
    assert!(t.engines.state.parts(&file.key).await.unwrap().is_empty());
    assert!(stored_blobs(&t).await.is_empty());
}

async fn completions_at_once_share_one_delivery_even_when_it_fails(engine: Engine) {
    let t = Setup::new(engine);
    *t.upstream.status.lock().unwrap() = 503;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *t.upstream.gate.lock().unwrap() = Some(gate.clone());
    let file = File::new("race.bin", 4);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    let entered = t.upstream.entered.notified();
    let first = tokio::spawn({
        let core = t.core.clone();
        async move {
            core.deliver(
                file_key("race.bin"),
                &forward(),
                request("a"),
                Instant::now(),
            )
            .await
        }
    });
    entered.await;
    // The second completion comes while the first delivery is in the upstream's hands.
    let second = tokio::spawn({
        let core = t.core.clone();
        async move {
            core.deliver(
                file_key("race.bin"),
                &forward(),
                request("a"),
                Instant::now(),
            )
            .await
        }
    });
    tokio::task::yield_now().await;
    gate.add_permits(10);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(answer(&first.outcome).status, 503);
    assert_eq!(answer(&second.outcome).status, 503, "the same answer");
    assert_eq!(t.calls(), 1, "one delivery for both");
    assert_eq!(
        t.engines.state.parts(&file.key).await.unwrap().len(),
        3,
        "a 503 keeps the parts"
    );
}

async fn a_request_under_way_while_a_delivery_failed_shares_its_outcome(engine: Engine) {
    let t = Setup::new(engine);
    *t.upstream.status.lock().unwrap() = 503;
    let file = File::new("overlap.bin", 4);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    // This request arrives, then waits (for the upload's lease, say) while an attempt fails.
    let arrived = Instant::now();
    tokio::time::advance(Duration::from_millis(10)).await;
    let failed = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert_eq!(answer(&failed.outcome).status, 503);
    let late = t
        .core
        .deliver(file.key, &forward(), request("a"), arrived)
        .await;
    assert_eq!(
        answer(&late.outcome).status,
        503,
        "the failed attempt's answer"
    );
    assert_eq!(t.calls(), 1, "the file was not sent again for it");
    // A request that comes after the failure (a retry) sends it again.
    *t.upstream.status.lock().unwrap() = 201;
    let retried = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert_eq!(answer(&retried.outcome).status, 201);
    assert_eq!(t.calls(), 2);
}

async fn a_failed_delivery_stays_queued_and_the_queue_delivers_it_after_the_backoff(
    engine: Engine,
) {
    let t = Setup::new(engine);
    *t.upstream.status.lock().unwrap() = 503;
    let file = File::new("queued.bin", 6);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    let failed = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert_eq!(answer(&failed.outcome).status, 503);
    let queued = t
        .engines
        .state
        .queued(&file.key)
        .await
        .unwrap()
        .expect("queued");
    assert_eq!((queued.attempts, queued.fields.clone()), (1, fields("a")));
    let forward_for = |_: &str| Some(forward());
    assert_eq!(
        t.core.deliver_due(&forward_for).await.unwrap(),
        0,
        "not due yet"
    );
    *t.upstream.status.lock().unwrap() = 201;
    t.advance(forward().retry_pause);
    tokio::time::advance(forward().retry_pause).await;
    assert_eq!(t.core.deliver_due(&forward_for).await.unwrap(), 1);
    // It runs in a task of its own; its answer is recorded when it ends.
    for _ in 0..100 {
        if t.core.recorded_answer(&file.key).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recorded = t
        .core
        .recorded_answer(&file.key)
        .await
        .unwrap()
        .expect("answered");
    assert_eq!(recorded.status, 201);
    assert_eq!(t.calls(), 2);
    assert!(
        t.engines.state.queued(&file.key).await.unwrap().is_none(),
        "no longer owed"
    );
    assert_eq!(t.core.deliver_due(&forward_for).await.unwrap(), 0);
}

fn file_key(name: &str) -> UploadKey {
    UploadKey::derive(&[name.as_bytes()])
}

async fn a_retry_after_a_failure_waits_the_retry_pause(engine: Engine) {
    let t = Setup::new(engine);
    *t.upstream.status.lock().unwrap() = 503;
    let file = File::new("pause.bin", 5);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    *t.upstream.status.lock().unwrap() = 201;
    let retried = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert_eq!(answer(&retried.outcome).status, 201);
    let at = t.upstream.at.lock().unwrap().clone();
    assert_eq!(at.len(), 2);
    assert!(
        at[1] - at[0] >= forward().retry_pause,
        "the retry waited {:?}",
        at[1] - at[0]
    );
}

async fn the_answer_is_replayed_to_the_same_fields_and_other_fields_deliver_again(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("fields.bin", 6);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    // The same bytes again, same fields: the answer, no delivery.
    for n in 1..=3 {
        assert!(matches!(
            put(&t, &file, n, "a").await,
            PartStatus::Delivered(_)
        ));
    }
    assert_eq!(t.calls(), 1);
    // The same bytes for another folder: a new upload, delivered in its turn.
    for n in 1..=2 {
        assert!(matches!(
            put(&t, &file, n, "b").await,
            PartStatus::Stored { complete: false }
        ));
    }
    complete_and_deliver(&t, &file, "b").await;
    assert_eq!(t.calls(), 2);
}

async fn a_different_file_under_a_delivered_key_is_delivered_whole(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("same-name.bin", 7);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    // Same name and size, the first kilobyte edited.
    let mut edited = File::new("same-name.bin", 7);
    edited.data[..1000].iter_mut().for_each(|b| *b ^= 0xff);
    assert!(matches!(
        put(&t, &edited, 2, "a").await,
        PartStatus::Delivered(_)
    ));
    assert!(matches!(
        put(&t, &edited, 1, "a").await,
        PartStatus::Stored { complete: false }
    ));
    complete_and_deliver(&t, &edited, "a").await;
    let received = t.upstream.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].0, edited.sha256());
    assert_ne!(
        received[0].1, received[1].1,
        "another delivery, another key"
    );
}

async fn an_idle_upload_expires_and_its_bytes_go(engine: Engine) {
    let t = Setup::new(engine);
    let idle = File::new("idle.bin", 8);
    let active = File::new("active.bin", 9);
    put(&t, &idle, 1, "a").await;
    put(&t, &active, 1, "a").await;
    t.advance(TTLS.upload - Duration::from_secs(60));
    put(&t, &active, 2, "a").await;
    t.advance(Duration::from_secs(120));
    assert_eq!(t.core.sweep().await.unwrap(), 1, "only the idle one");
    assert!(t.engines.state.meta(&idle.key).await.unwrap().is_none());
    assert_eq!(t.engines.state.parts(&active.key).await.unwrap().len(), 2);
    assert_eq!(stored_blobs(&t).await.len(), 2);
    // Much later, the other one goes too.
    t.advance(TTLS.upload * 2);
    assert_eq!(t.core.sweep().await.unwrap(), 1);
    assert!(stored_blobs(&t).await.is_empty());
}

async fn an_upload_terminated_between_its_last_part_and_its_delivery_is_gone_not_owed(
    engine: Engine,
) {
    // A DELETE that races the completing request: it takes the upload's lease between the
    // last part and the delivery. Nothing is sent, nothing stays queued, and the completing
    // request learns that the upload is gone (not that its delivery will be retried).
    let t = Setup::new(engine);
    let file = File::new("terminated.bin", 24);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core.terminate(&file.key).await.unwrap();
    let delivery = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert!(
        matches!(delivery.outcome, Outcome::Gone),
        "{:?}",
        delivery.outcome
    );
    assert_eq!(t.calls(), 0);
    assert!(t.engines.state.queued(&file.key).await.unwrap().is_none());
    t.advance(Duration::from_secs(3600));
    let forward_for = |_: &str| Some(forward());
    assert_eq!(
        t.core.deliver_due(&forward_for).await.unwrap(),
        0,
        "nothing owed"
    );
    assert_eq!(t.calls(), 0);
}

async fn a_delivered_answer_expires_after_result_ttl(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("answered.bin", 10);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    t.advance(TTLS.result / 2);
    assert_eq!(t.core.sweep().await.unwrap(), 0);
    assert!(t.engines.state.answer(&file.key).await.unwrap().is_some());
    t.advance(TTLS.result);
    assert_eq!(t.core.sweep().await.unwrap(), 1);
    assert!(t.engines.state.answer(&file.key).await.unwrap().is_none());
}

async fn a_chunk_kept_after_delivery_is_asked_for_again_once_the_answer_expired(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("stale.bin", 16);
    store_all_but_last(&t, &file).await;
    complete_and_deliver(&t, &file, "a").await;
    // A retry of chunk 2 whose answer was lost: kept, and answered with the delivered file's.
    assert!(matches!(
        put(&t, &file, 2, "a").await,
        PartStatus::Delivered(_)
    ));
    // The answer expires; the chunk stays for the upload it may still belong to.
    t.advance(TTLS.result * 2);
    t.core.sweep().await.unwrap();
    assert!(t.engines.state.answer(&file.key).await.unwrap().is_none());
    // A new file under the same key, its client asking about chunk 2 before sending it: it
    // is told to send it, not handed the delivered file's.
    let mut other = File::new("stale.bin", 16);
    other.data.iter_mut().for_each(|b| *b = b.wrapping_add(3));
    let (part, _) = other.part(2);
    let digest = FieldsDigest::of(&fields("a"));
    let status = t.core.status(&other.key, &other.meta, part, &digest).await;
    assert!(matches!(status, Ok(PartStatus::Missing)), "{status:?}");
    for n in 1..=2 {
        put(&t, &other, n, "a").await;
    }
    complete_and_deliver(&t, &other, "a").await;
    let received = t.upstream.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].0, other.sha256(), "the new file, whole");
}

async fn a_delivered_upload_is_listed_while_its_answer_is_kept(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("listed.bin", 11);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    t.core.cleanups().idle(Duration::from_secs(5)).await;
    let listed = t.core.inventory(true).await.unwrap();
    assert_eq!(listed.uploads.len(), 1);
    let upload = &listed.uploads[0];
    assert_eq!(upload.delivery, "delivered");
    assert_eq!(upload.declared_bytes, Some(3000));
    assert_eq!(
        (upload.parts, upload.stored_bytes),
        (0, 0),
        "its parts went"
    );
    assert_eq!(upload.file_name.as_deref(), Some("listed.bin"));
    // Gone from the listing once its answer expires.
    t.advance(TTLS.result * 2);
    t.core.sweep().await.unwrap();
    assert!(t.core.inventory(false).await.unwrap().uploads.is_empty());
}

async fn appends_at_the_offset_keep_what_a_broken_body_brought(engine: Engine) {
    let t = Setup::new(engine);
    let key = file_key("appended.bin");
    let mut meta = File::new("appended.bin", 11).meta;
    meta.length = None;
    meta.protocol = serde_json::Value::Null;
    t.core.create(&key, &meta).await.unwrap();
    t.core.declare_length(&key, 2500).await.unwrap();
    let accept = |_: &stitch::store::Staged| true;
    let first = t
        .core
        .append(&key, 0, &mut Body::of(vec![1; 1000]), 1 << 20, &accept)
        .await
        .unwrap();
    assert_eq!((first.offset, first.complete), (1000, false));
    let wrong = t
        .core
        .append(&key, 500, &mut Body::of(vec![2; 10]), 1 << 20, &accept)
        .await;
    assert!(matches!(
        wrong,
        Err(CoreError::OffsetMismatch { current: 1000 })
    ));
    let mut broken = Body(vec![Bytes::from(vec![3; 700])], Some(BodyError::Stalled));
    let cut = t
        .core
        .append(&key, 1000, &mut broken, 1 << 20, &accept)
        .await
        .unwrap();
    assert_eq!(cut.offset, 1700, "the bytes that arrived are kept");
    assert_eq!(cut.broke_off, Some(BodyError::Stalled));
    let over = t
        .core
        .append(&key, 1700, &mut Body::of(vec![4; 900]), 1 << 20, &accept)
        .await;
    assert!(
        matches!(over, Err(CoreError::TooLong { limit: 800 })),
        "past the length: refused, nothing kept"
    );
    let refused = t
        .core
        .append(&key, 1700, &mut Body::of(vec![4; 800]), 1 << 20, &|_| false)
        .await;
    assert!(matches!(refused, Err(CoreError::Refused)));
    let last = t
        .core
        .append(&key, 1700, &mut Body::of(vec![4; 800]), 1 << 20, &accept)
        .await
        .unwrap();
    assert_eq!((last.offset, last.complete), (2500, true));
    assert_eq!(t.core.progress(&key).await.unwrap().unwrap().offset, 2500);
    t.core.terminate(&key).await.unwrap();
    assert!(t.core.progress(&key).await.unwrap().is_none());
    assert!(stored_blobs(&t).await.is_empty());
    // A length declared late cannot be shorter than what is stored already.
    let deferred = file_key("deferred.bin");
    t.core.create(&deferred, &meta).await.unwrap();
    t.core
        .append(&deferred, 0, &mut Body::of(vec![5; 1000]), 1 << 20, &accept)
        .await
        .unwrap();
    assert!(t.core.declare_length(&deferred, 500).await.is_err());
    t.core.declare_length(&deferred, 1000).await.unwrap();
    let progress = t.core.progress(&deferred).await.unwrap().unwrap();
    assert_eq!((progress.offset, progress.meta.length), (1000, Some(1000)));
}

/// A state engine that fails to make new parts durable while `failing` is set (the fsync of
/// their directory reports an error); every other call goes to the engine it wraps.
struct FailingSync {
    inner: Arc<dyn StateStore>,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl StateStore for FailingSync {
    async fn meta(&self, upload: &UploadKey) -> Result<Option<UploadMeta>, StoreError> {
        self.inner.meta(upload).await
    }
    async fn save_meta(&self, u: &UploadKey, m: &UploadMeta, f: Fence) -> Result<(), StoreError> {
        self.inner.save_meta(u, m, f).await
    }
    async fn remove_meta(&self, u: &UploadKey, f: Fence) -> Result<(), StoreError> {
        self.inner.remove_meta(u, f).await
    }
    async fn parts(&self, u: &UploadKey) -> Result<Arc<PartIndex>, StoreError> {
        self.inner.parts(u).await
    }
    async fn add_part(&self, u: &UploadKey, p: StoredPart, f: Fence) -> Result<bool, StoreError> {
        self.inner.add_part(u, p, f).await
    }
    async fn add_part_unsynced(
        &self,
        u: &UploadKey,
        p: StoredPart,
        f: Fence,
    ) -> Result<bool, StoreError> {
        self.inner.add_part_unsynced(u, p, f).await
    }
    async fn sync_parts(&self, u: &UploadKey) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other("fsync: I/O error")));
        }
        self.inner.sync_parts(u).await
    }
    async fn remove_part(
        &self,
        u: &UploadKey,
        n: u64,
        f: Fence,
    ) -> Result<Option<Digest>, StoreError> {
        self.inner.remove_part(u, n, f).await
    }
    async fn remove_parts(&self, u: &UploadKey, f: Fence) -> Result<Vec<Digest>, StoreError> {
        self.inner.remove_parts(u, f).await
    }
    async fn open_part(
        &self,
        u: &UploadKey,
        p: &StoredPart,
    ) -> Result<Option<StoredReader>, StoreError> {
        self.inner.open_part(u, p).await
    }
    async fn is_referenced(&self, d: &Digest) -> Result<bool, StoreError> {
        self.inner.is_referenced(d).await
    }
    async fn answer(
        &self,
        u: &UploadKey,
    ) -> Result<Option<(RecordedAnswer, SystemTime)>, StoreError> {
        self.inner.answer(u).await
    }
    async fn save_answer(
        &self,
        u: &UploadKey,
        a: &RecordedAnswer,
        at: SystemTime,
        f: Fence,
    ) -> Result<(), StoreError> {
        self.inner.save_answer(u, a, at, f).await
    }
    async fn remove_answer(&self, u: &UploadKey, f: Fence) -> Result<(), StoreError> {
        self.inner.remove_answer(u, f).await
    }
    async fn mark_delivering(&self, u: &UploadKey, d: bool, f: Fence) -> Result<(), StoreError> {
        self.inner.mark_delivering(u, d, f).await
    }
    async fn was_delivering(&self, u: &UploadKey) -> Result<bool, StoreError> {
        self.inner.was_delivering(u).await
    }
    async fn touch(&self, u: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        self.inner.touch(u, at).await
    }
    async fn reindex(&self, u: &UploadKey, at: SystemTime) -> Result<(), StoreError> {
        self.inner.reindex(u, at).await
    }
    async fn last_activity(&self, u: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        self.inner.last_activity(u).await
    }
    async fn ask_to_stop(&self, u: &UploadKey, arrived: SystemTime) -> Result<(), StoreError> {
        self.inner.ask_to_stop(u, arrived).await
    }
    async fn stop_asked(&self, u: &UploadKey) -> Result<Option<SystemTime>, StoreError> {
        self.inner.stop_asked(u).await
    }
    async fn forget_stop_requests(&self, before: SystemTime) -> Result<(), StoreError> {
        self.inner.forget_stop_requests(before).await
    }
    async fn idle_since(&self, before: SystemTime) -> Result<Vec<UploadKey>, StoreError> {
        self.inner.idle_since(before).await
    }
    async fn prune_activity(&self, before: SystemTime) -> Result<(), StoreError> {
        self.inner.prune_activity(before).await
    }
    async fn remove(&self, u: &UploadKey, f: Fence) -> Result<(), StoreError> {
        self.inner.remove(u, f).await
    }
    async fn queue(&self, u: &UploadKey, e: &QueuedDelivery, f: Fence) -> Result<(), StoreError> {
        self.inner.queue(u, e, f).await
    }
    async fn queued(&self, u: &UploadKey) -> Result<Option<QueuedDelivery>, StoreError> {
        self.inner.queued(u).await
    }
    async fn unqueue(&self, u: &UploadKey, f: Fence) -> Result<(), StoreError> {
        self.inner.unqueue(u, f).await
    }
    async fn all_queued(&self) -> Result<Vec<(UploadKey, QueuedDelivery)>, StoreError> {
        self.inner.all_queued().await
    }
    async fn uploads(&self) -> Result<Vec<UploadKey>, StoreError> {
        self.inner.uploads().await
    }
}

/// A chunk's link that cannot be made durable: the chunk is refused, and no answer says the
/// part is stored (neither a test nor the same chunk sent again) until a later fsync succeeds;
/// a duplicate whose fsync fails takes nothing away from a part already stored. The file is
/// then delivered once, whole, and no bytes are left behind.
async fn a_part_that_cannot_be_made_durable_is_refused_and_not_taken_for_stored(engine: Engine) {
    let mut t = Setup::new(engine);
    let failing = Arc::new(FailingSync {
        inner: t.engines.state.clone(),
        failing: std::sync::atomic::AtomicBool::new(true),
    });
    t.engines = Engines::new(
        t.engines.blobs.clone(),
        failing.clone(),
        t.engines.locker.clone(),
        t.engines.closed(),
    );
    t.core = Arc::new(UploadCore::new(
        t.engines.clone(),
        t.upstream.clone(),
        t.clock.clone(),
        TTLS,
        InFlight::default(),
    ));
    let file = File::new("durable.bin", 7);
    let digest = FieldsDigest::of(&fields("a"));
    let put_first = || async {
        let (part, bytes) = file.part(1);
        t.core
            .put_part(&file.key, &file.meta, part, &mut Body::of(bytes), &digest)
            .await
    };
    let status_of_first = || async {
        let (part, _) = file.part(1);
        t.core.status(&file.key, &file.meta, part, &digest).await
    };
    let refused = put_first().await;
    assert!(
        matches!(refused, Err(CoreError::Store(_))),
        "refused: {refused:?}"
    );
    let tested = status_of_first().await;
    assert!(
        !matches!(tested, Ok(PartStatus::Stored { .. })),
        "not said to be stored while it cannot be made durable: {tested:?}"
    );
    let again = put_first().await;
    assert!(
        !matches!(again, Ok(PartStatus::Stored { .. })),
        "the same chunk again is not told it is stored either: {again:?}"
    );
    failing.failing.store(false, Ordering::SeqCst);
    assert!(matches!(
        status_of_first().await,
        Ok(PartStatus::Stored { complete: false })
    ));
    failing.failing.store(true, Ordering::SeqCst);
    assert!(put_first().await.is_err());
    failing.failing.store(false, Ordering::SeqCst);
    assert!(
        matches!(
            status_of_first().await,
            Ok(PartStatus::Stored { complete: false })
        ),
        "a duplicate that failed took nothing away"
    );
    store_all_but_last(&t, &file).await;
    let delivery = complete_and_deliver(&t, &file, "a").await;
    assert_eq!(answer(&delivery.outcome).status, 201);
    assert_eq!(t.calls(), 1);
    assert_eq!(t.upstream.received.lock().unwrap()[0].0, file.sha256());
    assert!(stored_blobs(&t).await.is_empty(), "no bytes left behind");
}

macro_rules! on_every_engine {
    ($($test:ident),* $(,)?) => {
        mod fs_engine {
            $(
                #[tokio::test(start_paused = true)]
                async fn $test() {
                    super::$test(super::Engine::Fs).await
                }
            )*
        }
        mod memory_engine {
            $(
                #[tokio::test(start_paused = true)]
                async fn $test() {
                    super::$test(super::Engine::Memory).await
                }
            )*
        }
    };
}

on_every_engine!(
    parts_are_stored_once_and_complete_the_file,
    a_part_that_contradicts_the_first_is_refused_and_changes_nothing,
    a_body_shorter_than_declared_is_refused_and_stores_nothing,
    completions_at_once_share_one_delivery_even_when_it_fails,
    a_request_under_way_while_a_delivery_failed_shares_its_outcome,
    a_failed_delivery_stays_queued_and_the_queue_delivers_it_after_the_backoff,
    a_retry_after_a_failure_waits_the_retry_pause,
    the_answer_is_replayed_to_the_same_fields_and_other_fields_deliver_again,
    a_different_file_under_a_delivered_key_is_delivered_whole,
    an_idle_upload_expires_and_its_bytes_go,
    a_delivered_answer_expires_after_result_ttl,
    a_chunk_kept_after_delivery_is_asked_for_again_once_the_answer_expired,
    a_delivered_upload_is_listed_while_its_answer_is_kept,
    appends_at_the_offset_keep_what_a_broken_body_brought,
    a_new_file_replaces_parts_resent_from_the_delivered_one,
    parts_left_beside_a_recorded_answer_are_not_taken_for_a_new_file,
    an_upload_terminated_between_its_last_part_and_its_delivery_is_gone_not_owed,
    a_part_that_cannot_be_made_durable_is_refused_and_not_taken_for_stored,
);

/// Leases that expire (an engine shared by several instances): a holder that stalled past its
/// lease can change nothing once another has taken it.
#[tokio::test(start_paused = true)]
async fn a_holder_whose_lease_expired_cannot_change_the_upload() {
    let t = Setup::new(Engine::Memory);
    let file = File::new("fenced.bin", 12);
    let lock = stitch::store::LockKey::Upload(file.key);
    let stale = t
        .engines
        .locker
        .lock(lock, Duration::from_secs(30))
        .await
        .unwrap();
    t.memory.as_ref().unwrap().expire_leases();
    let current = t
        .engines
        .locker
        .lock(lock, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(current.fence > stale.fence);
    let refused = t
        .engines
        .state
        .save_meta(&file.key, &file.meta, stale.fence)
        .await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))));
    assert!(t.engines.state.meta(&file.key).await.unwrap().is_none());
    t.engines
        .state
        .save_meta(&file.key, &file.meta, current.fence)
        .await
        .unwrap();
    assert!(t.engines.state.meta(&file.key).await.unwrap().is_some());
}

async fn a_new_file_replaces_parts_resent_from_the_delivered_one(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("resent.bin", 13);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    // A page reload sends chunk 1 of the delivered file again: kept, answered.
    assert!(matches!(
        put(&t, &file, 1, "a").await,
        PartStatus::Delivered(_)
    ));
    // Then another file under the same key: its chunk 1 must win over the one kept.
    let mut other = File::new("resent.bin", 13);
    other.data.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    for n in 1..=2 {
        assert!(matches!(
            put(&t, &other, n, "a").await,
            PartStatus::Stored { complete: false }
        ));
    }
    complete_and_deliver(&t, &other, "a").await;
    let received = t.upstream.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].0, other.sha256(), "the new file, whole");
}

async fn parts_left_beside_a_recorded_answer_are_not_taken_for_a_new_file(engine: Engine) {
    let t = Setup::new(engine);
    let file = File::new("leftover.bin", 14);
    store_all_but_last(&t, &file).await;
    put(&t, &file, 3, "a").await;
    t.core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    // As if the process had died between recording the answer and removing the parts.
    let lease = t
        .engines
        .locker
        .lock(
            stitch::store::LockKey::Upload(file.key),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    t.engines
        .state
        .save_meta(&file.key, &file.meta, lease.fence)
        .await
        .unwrap();
    for n in 1..=3 {
        let (_, bytes) = file.part(n);
        let staged = t
            .engines
            .blobs
            .stage(&mut Body::of(bytes), 1000)
            .await
            .unwrap();
        let part = StoredPart {
            number: n,
            len: staged.len,
            digest: staged.digest,
        };
        t.engines.blobs.keep(staged).await.unwrap();
        t.engines
            .state
            .add_part(&file.key, part, lease.fence)
            .await
            .unwrap();
    }
    drop(lease);
    let mut other = File::new("leftover.bin", 14);
    other.data.iter_mut().for_each(|b| *b = b.wrapping_add(7));
    assert!(matches!(
        put(&t, &other, 2, "a").await,
        PartStatus::Stored { complete: false }
    ));
    for n in [1, 3] {
        put(&t, &other, n, "a").await;
    }
    t.core
        .deliver(other.key, &forward(), request("a"), Instant::now())
        .await;
    let received = t.upstream.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].0, other.sha256());
}

/// Two upload keys that the `fs` engine hashes onto the same lock file.
fn keys_sharing_a_lock_stripe() -> (String, String) {
    let stripe = |name: &str| {
        let hex = UploadKey::derive(&[name.as_bytes()]).hex();
        u64::from_str_radix(&hex[..8], 16).unwrap() % 1024
    };
    let mut seen = std::collections::HashMap::new();
    for i in 0.. {
        let name = format!("stripe-{i}.bin");
        if let Some(other) = seen.insert(stripe(&name), name.clone()) {
            return (other, name);
        }
    }
    unreachable!()
}

#[tokio::test(start_paused = true)]
async fn a_long_delivery_does_not_hold_up_another_upload_on_the_same_lock_stripe() {
    let t = Setup::new(Engine::Fs);
    let (a, b) = keys_sharing_a_lock_stripe();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *t.upstream.gate.lock().unwrap() = Some(gate.clone());
    let first = File::new(&a, 15);
    store_all_but_last(&t, &first).await;
    put(&t, &first, 3, "a").await;
    let entered = t.upstream.entered.notified();
    let delivering = tokio::spawn({
        let core = t.core.clone();
        let key = first.key;
        async move {
            core.deliver(key, &forward(), request("a"), Instant::now())
                .await
        }
    });
    entered.await;
    // The first upload's delivery is in the upstream's hands, under its lease.
    let second = File::new(&b, 16);
    let stored = tokio::time::timeout(Duration::from_secs(60), put(&t, &second, 1, "a")).await;
    assert!(
        matches!(stored, Ok(PartStatus::Stored { .. })),
        "the other upload's chunk waited for the delivery"
    );
    gate.add_permits(10);
    delivering.await.unwrap();
}

#[tokio::test]
async fn a_part_is_delivered_even_if_its_blobs_own_name_is_lost() {
    // Only the part's link is fsynced into a directory; after a power loss the blob's own
    // name may be gone while the link survives.
    let t = Setup::new(Engine::Fs);
    let file = File::new("linked.bin", 17);
    for n in 1..=3 {
        put(&t, &file, n, "a").await;
    }
    let blobs = t._dir.path().join("blobs");
    for shard in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            std::fs::remove_file(blob.unwrap().path()).unwrap();
        }
    }
    let delivery = t
        .core
        .deliver(file.key, &forward(), request("a"), Instant::now())
        .await;
    assert_eq!(answer(&delivery.outcome).status, 201);
    assert_eq!(t.upstream.received.lock().unwrap()[0].0, file.sha256());
}

#[tokio::test]
async fn a_store_whose_blobs_are_named_by_sha256_is_still_read_after_an_upgrade() {
    // Stores written before blobs were named by BLAKE3 name them (and their parts' links) by
    // SHA-256. An upload begun then is finished and delivered, byte-exact, after the upgrade.
    let t = Setup::new(Engine::Fs);
    let file = File::new("older.bin", 23);
    store_all_but_last(&t, &file).await;
    let root = t._dir.path().to_path_buf();
    let mut renamed = 0;
    for n in 1..=2 {
        let (_, bytes) = file.part(n);
        let (old, new) = (
            hex::encode(blake3::hash(&bytes).as_bytes()),
            hex::encode(Sha256::digest(&bytes)),
        );
        let blob = root.join("blobs").join(&old[..2]).join(&old);
        std::fs::create_dir_all(root.join("blobs").join(&new[..2])).unwrap();
        std::fs::rename(&blob, root.join("blobs").join(&new[..2]).join(&new)).unwrap();
        for upload in std::fs::read_dir(root.join("uploads")).unwrap() {
            let parts = upload.unwrap().path().join("parts");
            for part in std::fs::read_dir(&parts).unwrap() {
                let name = part.unwrap().file_name().into_string().unwrap();
                if name.ends_with(&old) {
                    let older = name.replace(&old, &new);
                    std::fs::rename(parts.join(&name), parts.join(older)).unwrap();
                    renamed += 1;
                }
            }
        }
    }
    assert_eq!(
        renamed, 2,
        "both parts were named by their blob's BLAKE3 hash"
    );
    let t = t.reopened();
    let delivery = complete_and_deliver(&t, &file, "a").await;
    assert_eq!(answer(&delivery.outcome).status, 201);
    assert_eq!(t.upstream.received.lock().unwrap()[0].0, file.sha256());
    // The delivered upload released its blobs, those named the older way included.
    assert!(stored_blobs(&t).await.is_empty());
}

#[tokio::test]
async fn a_part_whose_length_changed_on_disk_fails_the_delivery_and_nothing_is_sent() {
    // Bytes changed under Stitch (a file cut or grown by hand, a repair after a disk fault): the
    // file is never sent with a part of another length than recorded.
    for change in [-1i64, 1] {
        let t = Setup::new(Engine::Fs);
        let file = File::new("changed.bin", 29);
        store_all_but_last(&t, &file).await;
        let mut changed = 0;
        for upload in std::fs::read_dir(t._dir.path().join("uploads")).unwrap() {
            let parts = upload.unwrap().path().join("parts");
            for part in std::fs::read_dir(&parts).unwrap() {
                let part = part.unwrap();
                if part.file_name().to_str().unwrap().starts_with("2-") {
                    let handle = std::fs::OpenOptions::new()
                        .write(true)
                        .open(part.path())
                        .unwrap();
                    handle.set_len((1000 + change) as u64).unwrap();
                    changed += 1;
                }
            }
        }
        assert_eq!(changed, 1, "part 2's link");
        let delivery = complete_and_deliver(&t, &file, "a").await;
        assert!(
            matches!(delivery.outcome, Outcome::StorageFailed),
            "{change:+} byte: {:?}",
            delivery.outcome
        );
        assert!(t.upstream.received.lock().unwrap().is_empty());
    }
}

/// The fs engine keeps metadata and "no answer yet" in memory for chunk tests; another process
/// changing them (here: a second engine on the same directory, with locks of its own) makes
/// this one read them again.
#[tokio::test]
async fn what_one_process_caches_is_read_again_once_another_changes_it() {
    use stitch::store::{Fence, LockKey, RecordedAnswer};
    let dir = tempfile::tempdir().unwrap();
    let open = || stitch::store::fs::open(dir.path(), true, Duration::from_secs(60)).unwrap();
    let (a, b) = (open(), open());
    let file = File::new("cached.bin", 3);
    let key = file.key;
    let lease = Duration::from_secs(30);
    {
        let held = a.locker.lock(LockKey::Upload(key), lease).await.unwrap();
        a.state
            .save_meta(&key, &file.meta, held.fence)
            .await
            .unwrap();
    }
    assert_eq!(a.state.meta(&key).await.unwrap(), Some(file.meta.clone()));
    assert!(a.state.answer(&key).await.unwrap().is_none());
    // Read twice: the second time from memory.
    assert!(a.state.answer(&key).await.unwrap().is_none());

    let mut changed = file.meta.clone();
    changed.name = "renamed.bin".into();
    let answer = RecordedAnswer {
        status: 201,
        headers: vec![],
        fields: String::new(),
        file: None,
        refused_for: None,
        body: bytes::Bytes::from_static(b"kept"),
    };
    {
        let held = b.locker.lock(LockKey::Upload(key), lease).await.unwrap();
        let Fence(_) = held.fence;
        b.state.save_meta(&key, &changed, held.fence).await.unwrap();
        b.state
            .save_answer(&key, &answer, std::time::SystemTime::now(), held.fence)
            .await
            .unwrap();
    }
    assert_eq!(a.state.meta(&key).await.unwrap(), Some(changed));
    let (seen, _) = a
        .state
        .answer(&key)
        .await
        .unwrap()
        .expect("the answer B recorded");
    assert_eq!(seen.status, 201);
    assert_eq!(seen.body, "kept");
}

/// An add of a part whose request went away mid-way (its future dropped once the link was
/// under way) must not leave the fs engine trusting the index from before it: the same part
/// number sent again with other bytes would be linked beside the first, and which of the two
/// a later listing found would decide the file's bytes.
#[tokio::test]
async fn an_add_given_up_mid_way_leaves_the_index_as_the_disk_has_it() {
    use futures::FutureExt;
    use stitch::store::LockKey;
    let t = Setup::new(Engine::Fs);
    let file = File::new("given-up.bin", 2);
    let key = file.key;
    let stage = |n: u64, shift: u8| {
        let (_, mut bytes) = file.part(n);
        bytes.iter_mut().for_each(|b| *b = b.wrapping_add(shift));
        let blobs = t.engines.blobs.clone();
        async move {
            let staged = blobs.stage(&mut Body::of(bytes), 1000).await.unwrap();
            let part = StoredPart {
                number: n,
                len: staged.len,
                digest: staged.digest,
            };
            blobs.keep(staged).await.unwrap();
            part
        }
    };
    let lease = t
        .engines
        .locker
        .lock(LockKey::Upload(key), Duration::from_secs(30))
        .await
        .unwrap();
    let first = stage(1, 0).await;
    assert!(t
        .engines
        .state
        .add_part(&key, first, lease.fence)
        .await
        .unwrap());
    assert_eq!(t.engines.state.parts(&key).await.unwrap().len(), 1);
    let second = stage(2, 0).await;
    // Polled once (the link goes to the blocking pool), then dropped.
    let given_up = t.engines.state.add_part(&key, second, lease.fence);
    assert!(given_up.now_or_never().is_none());
    // The link lands all the same.
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.engines.state.parts(&key).await.unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the dropped add's part never showed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.engines.state.parts(&key).await.unwrap()[&2], second);
    // Other bytes for the same number: the part is there already.
    let other = stage(2, 1).await;
    assert_ne!(other.digest, second.digest);
    assert!(!t
        .engines
        .state
        .add_part(&key, other, lease.fence)
        .await
        .unwrap());
    assert_eq!(t.engines.state.parts(&key).await.unwrap()[&2], second);
}

#[tokio::test]
async fn a_request_to_stop_keeps_the_newest_asker_to_the_nanosecond_and_is_forgotten_after_a_minute(
) {
    // Two processes on one storage directory: a request that waits for an upload held by the
    // other process asks it to stop, stamped with its arrival. The newest stamp stands, exact
    // (file times are to the second on some file systems), and an old one goes with a sweep
    // (e.g. one asked for an upload the other process removed meanwhile).
    let t = Setup::new(Engine::Fs);
    let state = &t.engines.state;
    let gone = UploadKey::random();
    let asked = SystemTime::now() - Duration::from_secs(10);
    state.ask_to_stop(&gone, asked).await.unwrap();
    state
        .ask_to_stop(&gone, asked - Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(state.stop_asked(&gone).await.unwrap(), Some(asked));
    let newer = asked + Duration::from_nanos(1);
    state.ask_to_stop(&gone, newer).await.unwrap();
    assert_eq!(state.stop_asked(&gone).await.unwrap(), Some(newer));

    t.core.sweep().await.unwrap();
    assert_eq!(state.stop_asked(&gone).await.unwrap(), Some(newer), "fresh");
    t.advance(Duration::from_secs(61));
    t.core.sweep().await.unwrap();
    assert_eq!(state.stop_asked(&gone).await.unwrap(), None);
    let stops = std::fs::read_dir(t._dir.path().join("stops")).unwrap();
    assert_eq!(stops.count(), 0, "nothing left in the storage directory");
}
