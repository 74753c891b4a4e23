//! Abandoned uploads expire on their own (clients never say they gave up), and recorded answers
//! are replayed only for a while.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test]
async fn an_abandoned_upload_expires_and_its_chunks_are_deleted() {
    let h = Harness::with_storage("  upload_ttl: 1s\n", ROUTES).await;
    let file = ChunkedFile::resumable("abandoned.bin", random_bytes(3000, 50), 1000);
    assert_eq!(file.upload(&h, 1).await.status(), 200);
    assert_eq!(file.test(&h, 1).await.status(), 200);
    // Expired: its test requests answer 204 again, so the client uploads it anew.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while file.test(&h, 1).await.status() != 204 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (A test may see the parts gone while the sweep still deletes the rest.)
    while (h.blob_count(), h.upload_files()) != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "its chunks were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_recorded_answer_is_replayed_until_it_expires_then_a_new_upload_starts() {
    let h = Harness::with_storage("  result_ttl: 3s\n", ROUTES).await;
    h.upstream.answer_with(201, "first");
    let file = ChunkedFile::flow("again.txt", random_bytes(10, 51), 1000);
    assert_eq!(file.upload(&h, 1).await.status(), 201);
    assert_eq!(
        file.upload(&h, 1).await.text().await.unwrap(),
        "first",
        "replayed"
    );
    tokio::time::sleep(Duration::from_millis(4500)).await;
    h.upstream.answer_with(201, "second");
    let again = file.upload(&h, 1).await;
    assert_eq!(
        again.text().await.unwrap(),
        "second",
        "the same file uploaded anew"
    );
    assert_eq!(h.upstream.received_at("/app/upload").len(), 2);
}

#[tokio::test]
async fn chunk_bytes_no_upload_uses_are_collected() {
    // What a crash between storing a chunk's bytes and publishing the part leaves behind.
    let h = Harness::with_storage("  upload_ttl: 1s\n", ROUTES).await;
    let orphan_dir = h.dir.path().join("blobs").join("ab");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    let orphan = orphan_dir.join(format!("ab{}", "0".repeat(62)));
    std::fs::write(&orphan, b"left behind").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while orphan.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan was never collected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_upload_of_the_same_file_again_outlives_the_old_answer() {
    let h = Harness::with_storage("  result_ttl: 1s\n", ROUTES).await;
    let mut file = ChunkedFile::resumable("twice.pdf", random_bytes(3000, 53), 1000);
    file.extra = vec![("folder".into(), "1".into())];
    file.upload_all(&h).await;
    file.extra = vec![("folder".into(), "2".into())];
    assert_eq!(file.upload(&h, 1).await.status(), 200);
    assert_eq!(file.upload(&h, 2).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        file.test(&h, 1).await.status(),
        200,
        "the new upload's parts survived"
    );
    assert_eq!(file.upload(&h, 3).await.status(), 200);
    let received = h.upstream.received_at("/app/upload");
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].field("folder"), Some("2"));
    assert_eq!(received[1].files[0].sha256, file.sha256());
}
