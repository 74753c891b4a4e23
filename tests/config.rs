//! The configuration: every example in conf/ is valid, and a broken file is refused with a
//! message that names the key and the line.

use std::process::Command;

fn stitch_check(path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run stitch check")
}

#[test]
fn every_example_config_passes_stitch_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let output = stitch_check(&path);
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "conf/ holds the examples");
}

fn check_text(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = stitch_check(&path);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_unknown_key_is_an_error_naming_the_key_and_line() {
    let (ok, message) = check_text(
        "listen: 127.0.0.1:8080\nroutes:\n  - path: /upload\n    protocol: resumable\n    forwrd: {}\n",
    );
    assert!(!ok);
    assert!(message.contains("forwrd"), "{message}");
    assert!(message.contains("line 5"), "{message}");
}

#[test]
fn an_invalid_value_is_an_error_naming_the_key_and_line() {
    let (ok, message) = check_text(
        "routes:\n  - path: /upload\n    protocol: resumable\n    limits:\n      max_chunk_size: lots\n",
    );
    assert!(!ok);
    assert!(message.contains("max_chunk_size"), "{message}");
    assert!(message.contains("line 5"), "{message}");
    let (ok, message) = check_text("routes:\n  - path: /x\n    protocol: tus-ish\n");
    assert!(!ok);
    assert!(
        message.contains("protocol") && message.contains("line 3"),
        "{message}"
    );
}

#[test]
fn a_regex_route_must_say_where_files_go() {
    let (ok, message) =
        check_text("routes:\n  - path: ^/up/[0-9]+$\n    match: regex\n    protocol: flow\n");
    assert!(!ok);
    assert!(message.contains("forward.path"), "{message}");
    assert!(
        message.contains("routes") && message.contains("line 2"),
        "{message}"
    );
}

#[test]
fn check_without_a_config_validates_the_embedded_default() {
    let output = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("check")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("embedded default"));
}

#[test]
fn a_taken_listen_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.yaml");
    let storage = dir.path().join("data");
    std::fs::write(
        &path,
        format!("listen: {addr}\nstorage:\n  dir: {}\n", storage.display()),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!("cannot listen on {addr}")),
        "{message}"
    );
}

#[test]
fn headers_stitch_sets_itself_cannot_be_copied_from_the_client() {
    let (ok, message) = check_text(
        "routes:\n  - path: /upload\n    protocol: resumable\n    forward:\n      headers: [cookie, Host]\n",
    );
    assert!(!ok);
    assert!(
        message.contains("forward.headers") && message.contains("host"),
        "{message}"
    );
}

/// `stitch check` on `yaml`: refused, with a message containing every one of `words`.
fn refused_naming(yaml: &str, words: &[&str]) {
    let (ok, message) = check_text(yaml);
    assert!(!ok, "accepted: {yaml}");
    for word in words {
        assert!(message.contains(word), "{word:?} missing from: {message}");
    }
}

#[test]
fn values_that_could_not_run_are_refused_by_check() {
    refused_naming("threads: 0\n", &["threads", "at least 1", "line 1"]);
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    methods: [GET, FETCH]\n",
        &["methods", "FETCH", "line 4"],
    );
    refused_naming(
        "storage:\n  upload_ttl: 0\n",
        &["storage.upload_ttl", "at least 1s", "line 2"],
    );
    refused_naming(
        "storage:\n  result_ttl: 0s\n",
        &["storage.result_ttl", "line 2"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    limits: { max_file_size: 1MiB, max_chunk_size: 2MiB }\n",
        &["max_chunk_size", "max_file_size", "line 2"],
    );
    refused_naming(
        "connections:\n  idle_timeout: 0\n",
        &["idle_timeout", "line 2"],
    );
    refused_naming(
        "connections:\n  max_header_size: 2MiB\n",
        &["max_header_size", "line 2"],
    );
    refused_naming("connect_timeout: 0\n", &["connect_timeout", "line 1"]);
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    forward: { timeout: 0s }\n",
        &["timeout", "line 4"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: resumable\n    parameters: { file: \"\" }\n",
        &["parameters.file"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    host: files.example.com:8080\n",
        &["host", "without a port"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    methods: []\n",
        &["methods", "at least one"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: tus\n    forward: { early: { streams: 0 } }\n",
        &["forward.early.streams", "1 or more"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: tus\n    forward: { early: { stall: 0s } }\n",
        &["stall", "above zero", "line 4"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: tus\n    forward: { early: { stal: 1s } }\n",
        &["stal", "line 4"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: tus\n    forward: { early: yes please }\n",
        &["`true`, `false` or settings", "line 4"],
    );
}

#[test]
fn options_of_another_protocol_and_non_prefix_tus_routes_are_refused() {
    refused_naming(
        "routes:\n  - path: /files\n    protocol: tus\n    parameters: { file: f }\n",
        &["parameters", "tus"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    tus: { max_metadata: 1KiB }\n",
        &["tus:", "tus routes"],
    );
    refused_naming(
        "routes:\n  - path: /files\n    match: exact\n    protocol: tus\n",
        &["tus route", "prefix"],
    );
    refused_naming(
        "routes:\n  - path: /files\n    protocol: tus\n    tus: { max_metadata: 1MiB }\n",
        &["tus.max_metadata"],
    );
}

#[test]
fn a_metadata_scope_is_only_for_tus_routes() {
    refused_naming(
        "routes:\n  - path: /up\n    protocol: resumable\n    scope: { metadata: token }\n",
        &["metadata", "tus routes"],
    );
}

#[test]
fn cors_settings_that_browsers_would_refuse_are_refused() {
    refused_naming(
        "routes:\n  - path: /files\n    protocol: tus\n    cors: { origins: [] }\n",
        &["cors.origins"],
    );
    refused_naming(
        "routes:\n  - path: /files\n    protocol: tus\n    cors: { origins: [\"app.example/\"] }\n",
        &["cors.origins", "app.example/"],
    );
    refused_naming(
        "routes:\n  - path: /files\n    protocol: tus\n    cors: { origins: [\"*\"], credentials: true }\n",
        &["cors", "credentials"],
    );
}

#[test]
fn a_smaller_max_file_size_lowers_the_default_chunk_limit_with_it() {
    let (ok, message) = check_text(
        "routes:\n  - path: /x\n    protocol: flow\n    scope: { cookie: s }\n    limits: { max_file_size: 1MiB }\n",
    );
    assert!(ok, "{message}");
}

#[test]
fn messages_use_plain_words_not_rust_type_names() {
    for (yaml, plain) in [
        ("threads: many\n", "a whole number"),
        ("routes:\n  - 7\n", "expected a route"),
        ("routes: 7\n", "expected a list"),
        (
            "routes:\n  - path: /x\n    protocol: flow\n    forward: { fields: 7 }\n",
            "`all`, `none` or a list of field names",
        ),
    ] {
        let (ok, message) = check_text(yaml);
        assert!(!ok);
        assert!(message.contains(plain), "{message}");
        for rust in ["usize", "u64", "struct", "Raw", "enum", "FieldPolicy"] {
            assert!(!message.contains(rust), "{rust:?} in: {message}");
        }
    }
}

#[test]
fn a_duplicate_key_names_its_line() {
    refused_naming(
        "listen: 127.0.0.1:1\nupstream: 127.0.0.1:2\nlisten: 127.0.0.1:3\n",
        &["duplicate", "listen", "line 3"],
    );
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n  - path: /y\n    protocol: flow\n    protocol: resumable\n",
        &["duplicate", "protocol", "line 6"],
    );
}

#[test]
fn an_empty_file_is_valid_and_check_warns_that_it_only_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.yaml");
    std::fs::write(&path, "").unwrap();
    let output = stitch_check(&path);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok, 0 upload routes"));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("pass-through only"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_counts_routes_in_plain_english() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.yaml");
    std::fs::write(
        &path,
        "routes:\n  - path: /x\n    protocol: flow\n    scope: { cookie: s }\n",
    )
    .unwrap();
    let output = stitch_check(&path);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok, 1 upload route\n"), "{stdout}");
    assert!(output.stderr.is_empty(), "no warning for a scoped route");
}

#[test]
fn check_help_says_what_check_does() {
    let output = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .args(["check", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("Check the configuration"), "{help}");
    assert!(help.contains("key and line"), "{help}");
}

#[tokio::test]
async fn a_host_name_listen_address_is_resolved_and_served() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: localhost:{port}\nthreads: 1\nshutdown_grace: 0\nstorage:\n  dir: {}\n",
        dir.path().display()
    );
    let config = stitch::Config::from_yaml(&yaml, "test").expect("a host name is accepted");
    assert!(config.listen.ip().is_loopback());
    let running = stitch::spawn(&config).unwrap();
    let status = reqwest::get(format!("http://localhost:{port}/anything"))
        .await
        .map(|r| r.status().as_u16());
    // Nothing listens upstream: the proxy itself answered (502), so it listened on localhost.
    assert_eq!(status.ok(), Some(502));
    running.stop();
}

#[test]
fn the_listing_token_comes_from_the_file_or_a_set_environment_variable() {
    refused_naming(
        "metrics:\n  listen: 127.0.0.1:9999\n  token: a\n  token_env: B\n",
        &["token or token_env, not both"],
    );
    refused_naming(
        "metrics:\n  listen: 127.0.0.1:9999\n  token_env: STITCH_TEST_TOKEN_NOBODY_SETS\n",
        &["STITCH_TEST_TOKEN_NOBODY_SETS", "not set"],
    );
    refused_naming(
        "metrics:\n  listen: 127.0.0.1:9999\n  token: \"  \"\n",
        &["token is empty"],
    );
    // Set in the environment of the process that reads the file: accepted.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.yaml");
    std::fs::write(
        &path,
        "metrics:\n  listen: 127.0.0.1:9999\n  token_env: STITCH_TEST_LISTING_TOKEN\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stitch"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("STITCH_TEST_LISTING_TOKEN", "from-the-environment")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn settings_that_would_run_wrongly_are_refused_by_check() {
    // A log level misspelt is a filter that silences every line; an empty storage directory
    // would be the working directory; metrics on the public address would answer uploads
    // with its own pages.
    refused_naming(
        "log: { level: inf }\n",
        &["\"inf\" is not a log level", "line 1"],
    );
    assert!(check_text("log: { level: \"info,pingora=warn\" }\n").0);
    assert!(check_text("log: { level: WARN }\n").0);
    assert!(check_text("log: { level: \"info,stitch\" }\n").0);
    refused_naming(
        "log: { level: \"inf,pingora=warn\" }\n",
        &["\"inf\" is not a log level"],
    );
    refused_naming("storage: { dir: '' }\n", &["storage.dir is empty"]);
    // A pause of nothing that "doubles" after each failure: the whole file sent again and
    // again at once.
    refused_naming(
        "routes:\n  - path: /x\n    protocol: flow\n    forward: { retry_pause: 0s }\n",
        &["above zero", "line 4"],
    );
    refused_naming(
        "listen: 127.0.0.1:18080\nmetrics: { listen: 127.0.0.1:18080 }\n",
        &["metrics.listen (127.0.0.1:18080)", "address of its own"],
    );
    refused_naming(
        "listen: 0.0.0.0:18080\nmetrics: { listen: 127.0.0.1:18080 }\n",
        &["metrics.listen"],
    );
    assert!(check_text("listen: 127.0.0.1:18080\nmetrics: { listen: 127.0.0.1:18081 }\n").0);
}

#[test]
fn a_route_that_an_earlier_one_covers_is_refused_and_in_the_other_order_accepted() {
    let shadowed = "routes:\n  - path: /upload\n    protocol: resumable\n  \
                    - path: /upload/tus\n    protocol: tus\n";
    refused_naming(
        shadowed,
        &[
            "routes[1] (/upload/tus) would never get its",
            "POST",
            "routes[0] (/upload)",
        ],
    );
    let reordered = "routes:\n  - path: /upload/tus\n    protocol: tus\n  \
                     - path: /upload\n    protocol: resumable\n";
    assert!(check_text(reordered).0);
    let exact_twice = "routes:\n  - path: /up\n    match: exact\n    protocol: flow\n  \
                       - path: /up\n    match: exact\n    host: a.example\n    protocol: flow\n";
    refused_naming(
        exact_twice,
        &["routes[1] (a.example/up) would never get its"],
    );
    // Not covered: another host, other methods, a sibling path.
    let other_methods = "routes:\n  - path: /upload\n    protocol: flow\n    methods: [DELETE]\n  \
                         - path: /upload/r\n    protocol: resumable\n";
    assert!(check_text(other_methods).0);
    let other_host = "routes:\n  - path: /upload\n    protocol: resumable\n    host: a.example\n  \
                      - path: /upload/tus\n    protocol: tus\n";
    assert!(check_text(other_host).0);
    let sibling = "routes:\n  - path: /upload\n    protocol: resumable\n  \
                   - path: /uploads\n    protocol: tus\n";
    assert!(check_text(sibling).0);
}

#[test]
fn a_regex_route_that_matches_a_later_routes_path_is_refused() {
    let regex = "routes:\n  - path: ^/up(load)?$\n    match: regex\n    protocol: flow\n    \
                 forward: { path: /files }\n";
    // Every chunk of an exact route at a path the regex matches would go to the regex route.
    refused_naming(
        &format!("{regex}  - path: /upload\n    match: exact\n    protocol: resumable\n"),
        &[
            "routes[1] (/upload) would never get its",
            "GET",
            "POST",
            "routes[0]",
        ],
    );
    // A tus route's creation POST goes to its path itself.
    refused_naming(
        &format!("{regex}  - path: /up\n    protocol: tus\n"),
        &["routes[1] (/up) would never get its", "POST"],
    );
    // Not covered: a path the regex does not match, or another host.
    assert!(check_text(&format!("{regex}  - path: /uploads\n    protocol: tus\n")).0);
    let other_host = regex.replace("protocol: flow", "protocol: flow\n    host: b.example");
    assert!(
        check_text(&format!(
            "{other_host}  - path: /upload\n    protocol: tus\n    host: a.example\n"
        ))
        .0
    );
}

#[test]
fn an_error_in_a_later_route_names_that_route_and_its_line() {
    let yaml = "routes:\n  - path: /a\n    protocol: resumable\n  # the second\n  \
                - path: /b\n    protocol: tus\n    tus: { max_metadata: 63B }\n";
    refused_naming(yaml, &["routes[1]: tus.max_metadata", "line 5"]);
    let yaml = "routes:\n  - path: /a\n    protocol: resumable\n    methods:\n      - GET\n  \
                - path: b\n    protocol: flow\n";
    refused_naming(yaml, &["routes[1]: route path \"b\"", "line 6"]);
    refused_naming(
        "listen: 127.0.0.1:8080\nfoo: 1\n",
        &["unknown field `foo`", "line 2"],
    );
    let yaml = "routes:   # uploads\n  - path: /a\n    protocol: resumable\n\n  \
                - path: /b\n    protocol: flow\n  - path: c\n    protocol: flow\n";
    refused_naming(yaml, &["routes[2]: route path \"c\"", "line 7"]);
}
