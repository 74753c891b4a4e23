//! Route matching (prefix, exact, regex, host, methods) and what a route forwards (fields,
//! protocol fields, extra headers, renamed parameters).

mod common;

use common::*;

const ROUTES: &str = r#"
routes:
  - path: /exact/upload
    match: exact
    protocol: flow
    forward: { path: /app/upload, field: document, fields: none }
  - path: ^/projects/[0-9]+/files$
    match: regex
    protocol: resumable
    methods: [GET, POST]
    forward: { path: /app/upload, field: document, fields: [folder], protocol_fields: true }
  - path: /hosted
    host: files.example.test
    protocol: resumable
    parameters: { chunk_number: n, identifier: id, file: blob }
    forward: { path: /app/upload, field: document, headers: [x-csrf-token] }
"#;

fn file_at(client: Client, route: &str, name: &str) -> ChunkedFile {
    ChunkedFile::new(
        client,
        route,
        name,
        Content::Bytes(random_bytes(1500, 70)),
        1000,
    )
}

#[tokio::test]
async fn an_exact_route_matches_only_its_path_and_forwards_no_fields_when_told_so() {
    let h = Harness::with_routes(ROUTES).await;
    let mut file = file_at(Client::Flow, "/exact/upload", "exact.txt");
    file.extra = vec![("folder".into(), "9".into())];
    assert_eq!(file.upload_all(&h).await.status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert!(request.fields.is_empty(), "fields: none");

    let mut below = file_at(Client::Flow, "/exact/upload/more", "below.txt");
    below.body = Body::Octet;
    below.upload(&h, 1).await;
    assert_eq!(
        h.upstream.received_at("/exact/upload/more").len(),
        1,
        "passed through"
    );
}

#[tokio::test]
async fn a_regex_route_limited_to_some_methods_forwards_listed_and_protocol_fields() {
    let h = Harness::with_routes(ROUTES).await;
    let mut file = file_at(Client::Resumable, "/projects/42/files", "regex.txt");
    file.extra = vec![("folder".into(), "7".into()), ("other".into(), "x".into())];
    assert_eq!(file.upload_all(&h).await.status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.field("folder"), Some("7"));
    assert_eq!(request.field("other"), None, "not in the fields list");
    assert_eq!(
        request.field("resumableIdentifier"),
        Some(file.identifier.as_str())
    );

    let mut put = file_at(Client::Resumable, "/projects/42/files", "put.txt");
    put.method = reqwest::Method::PUT;
    put.upload(&h, 1).await;
    assert_eq!(
        h.upstream.received_at("/projects/42/files").len(),
        1,
        "PUT is not intercepted"
    );
    assert_eq!(h.upstream.received_at("/app/upload").len(), 1);
}

#[tokio::test]
async fn a_host_route_with_renamed_parameters_copies_extra_headers() {
    let h = Harness::with_routes(ROUTES).await;
    let file = file_at(Client::Resumable, "/hosted", "hosted.txt");
    let rename = |params: Vec<(String, String)>| -> Vec<(String, String)> {
        params
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "resumableChunkNumber" => ("n".to_string(), v),
                "resumableIdentifier" => ("id".to_string(), v),
                _ => (k, v),
            })
            .collect()
    };
    let send = |host: &'static str| {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(rename(file.params(1)))
            .finish();
        let (boundary, head, tail) =
            multipart_frame(&rename(file.params(1)), "blob", "hosted.txt", "text/plain");
        let body = [&head[..], &random_bytes(1500, 70)[..], &tail[..]].concat();
        h.client
            .post(h.url(&format!("/hosted?{query}")))
            .header("host", host)
            .header("x-csrf-token", "t0k3n")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
    };
    assert_eq!(send("elsewhere.test").await.unwrap().status(), 200);
    assert_eq!(
        h.upstream.received_at("/hosted").len(),
        1,
        "another host passes through"
    );
    assert_eq!(send("files.example.test:8080").await.unwrap().status(), 200);
    let request = assert_delivered_once(&h, &file);
    assert_eq!(request.header("x-csrf-token"), Some("t0k3n"));
    assert_eq!(request.header("host"), Some("files.example.test:8080"));
}
