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
