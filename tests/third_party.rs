//! Stitch in front of an application nobody here wrote: PyPI's `uploadserver` (a plain
//! `POST /upload` form endpoint, field `files`, optionally behind basic auth). It knows nothing
//! of chunks or tus; it must receive each file whole, once.

mod common;

use common::process::UploadServer;
use common::*;
use sha2::{Digest, Sha256};

const ROUTE: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /upload, field: files }
"#;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn a_chunked_upload_arrives_whole_in_an_unchanged_application() {
    let app = UploadServer::start(None);
    let h = Harness::custom("", ROUTE, Some(app.app.addr), None).await;
    let file = ChunkedFile::resumable("holiday.mov", random_bytes(9 << 20, 90), 1 << 20);
    let done = file.upload_all(&h).await;
    assert_eq!(
        done.status(),
        200,
        "uploadserver's 204 reaches the client as 200"
    );
    let saved = app.saved();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].0, "holiday.mov");
    assert_eq!(sha256(&saved[0].1), file.sha256());
    assert_eq!(app.posts(), 1);
}

#[tokio::test]
async fn a_session_that_expired_during_the_upload_does_not_cost_the_user_the_file() {
    let app = UploadServer::start(Some("alice:s3cret"));
    let h = Harness::custom("", ROUTE, Some(app.app.addr), None).await;
    let mut file = ChunkedFile::resumable("thesis.pdf", random_bytes(3 << 20, 91), 1 << 20);
    file.headers = vec![("authorization".into(), "Basic YWxpY2U6ZXhwaXJlZA==".into())];
    let refused = file.upload_all(&h).await;
    assert_eq!(refused.status(), 401, "the application's answer");
    let again = file.upload(&h, file.count()).await;
    assert_eq!(again.status(), 401, "the same credentials: the same answer");
    assert_eq!(app.posts(), 1, "not sent again with credentials it refused");
    assert!(app.saved().is_empty());

    // Logged in again: the retry carries valid credentials, and nothing is uploaded anew.
    file.headers = vec![("authorization".into(), "Basic YWxpY2U6czNjcmV0".into())];
    let delivered = file.upload(&h, file.count()).await;
    assert_eq!(delivered.status(), 200);
    let saved = app.saved();
    assert_eq!(saved.len(), 1);
    assert_eq!(sha256(&saved[0].1), file.sha256());
    assert_eq!(app.posts(), 2);
}

const EARLY_ROUTE: &str = r#"
routes:
  - path: /upload
    protocol: resumable
    forward: { path: /upload, field: files, early: { stall: 500ms } }
"#;

#[tokio::test]
async fn with_early_delivery_the_file_arrives_whole_once_and_a_cut_stream_leaves_a_piece_in_uploadserver(
) {
    let app = UploadServer::start(None);
    let h = Harness::custom("", EARLY_ROUTE, Some(app.app.addr), None).await;
    // Streamed while it arrives.
    let streamed = ChunkedFile::resumable("streamed.mov", random_bytes(6 << 20, 92), 1 << 20);
    assert_eq!(streamed.upload_all(&h).await.status(), 200);
    // A client that pauses past the stall time: the application sees a request break off.
    let paused = ChunkedFile::resumable("paused.mov", random_bytes(4 << 20, 93), 1 << 20);
    for n in 1..=2 {
        assert_eq!(paused.upload(&h, n).await.status(), 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for n in 3..=paused.count() {
        assert_eq!(paused.upload(&h, n).await.status(), 200);
    }
    let saved = app.saved();
    let streamed_saved: Vec<_> = saved
        .iter()
        .filter(|(n, _)| n.starts_with("streamed"))
        .collect();
    assert_eq!(streamed_saved.len(), 1, "the streamed file saved once");
    assert_eq!(sha256(&streamed_saved[0].1), streamed.sha256());
    // The paused file arrives whole once. uploadserver also keeps what it had read of the
    // request that broke off: a piece of the file under its name. This is why early delivery
    // is not the default (README, "Early delivery").
    let paused_saved: Vec<_> = saved
        .iter()
        .filter(|(n, _)| n.starts_with("paused"))
        .collect();
    let whole: Vec<_> = paused_saved
        .iter()
        .filter(|(_, bytes)| sha256(bytes) == paused.sha256())
        .collect();
    assert_eq!(whole.len(), 1, "the paused file saved whole once");
    assert_eq!(
        paused_saved.len(),
        2,
        "and the piece of the cut request: {:?}",
        paused_saved
            .iter()
            .map(|(n, b)| (n, b.len()))
            .collect::<Vec<_>>()
    );
    let piece = paused_saved
        .iter()
        .find(|(_, b)| sha256(b) != paused.sha256())
        .unwrap();
    assert!(
        (piece.1.len() as u64) < paused.data.len(),
        "a piece shorter than the file"
    );
    assert_eq!(
        app.posts(),
        3,
        "uploadserver took the cut request for a post of its own"
    );
}

#[tokio::test]
async fn a_tus_upload_arrives_whole_in_an_unchanged_application_under_its_metadata_name() {
    use base64::Engine;
    use common::tus::{header, location_of, patch, tus};
    use reqwest::Method;
    let app = UploadServer::start(None);
    let routes = r#"
routes:
  - path: /files
    protocol: tus
    forward: { path: /upload, field: files }
"#;
    let h = Harness::custom("", routes, Some(app.app.addr), None).await;
    let data = random_bytes(5 << 20, 93);
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let created = tus(&h, Method::POST, "/files")
        .header("upload-length", data.len().to_string())
        .header(
            "upload-metadata",
            format!(
                "filename {},filetype {}",
                b64("minutes 2026.pdf"),
                b64("application/pdf")
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = location_of(&h, &created);
    let first = patch(&h, &location, 0, data.slice(..2 << 20)).await;
    assert_eq!(first.status(), 204);
    assert!(app.saved().is_empty(), "nothing before the file is whole");
    let last = patch(&h, &location, 2 << 20, data.slice(2 << 20..)).await;
    assert_eq!(last.status(), 204);
    assert_eq!(header(&last, "stitch-delivery"), Some("delivered"));
    assert_eq!(header(&last, "stitch-upstream-status"), Some("204"));
    let saved = app.saved();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].0, "minutes 2026.pdf");
    assert_eq!(sha256(&saved[0].1), sha256(&data));
    assert_eq!(app.posts(), 1);
}
