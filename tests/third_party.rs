//! Stitch in front of an application nobody here wrote: PyPI's `uploadserver` (a plain
//! `POST /upload` form endpoint, field `files`, optionally behind basic auth). It knows nothing
//! of chunks; it must receive each file whole, once.

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
