//! `roomcast user create` on a terminal: it asks for the password (twice, without
//! echo) instead of waiting silently for standard input to end. The terminal is a
//! real pseudo-terminal made by util-linux `script`.

#![cfg(unix)]

mod common;

use std::{
    io::{Read as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Backend, TestDatabase};

/// How long the command may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `roomcast user create --username NAME` on a pseudo-terminal whose input
/// is `typed`; answers (exit success, everything the terminal showed).
fn user_create_on_a_terminal(url: &str, name: &str, typed: &str) -> (bool, String) {
    let command = format!(
        "{} user create --username {name}",
        env!("CARGO_BIN_EXE_roomcast")
    );
    let cwd = tempfile::tempdir().expect("a temp dir");
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(cwd.path())
        .env_remove("ROOMCAST_CONFIG")
        .env("ROOMCAST_STORE__URL", url)
        .env("ROOMCAST_AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("ROOMCAST_AUTH__ARGON2_ITERATIONS", "1")
        .env("ROOMCAST_LOG__LEVEL", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run `script` (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(typed.as_bytes()).expect("type");
    // Keep the terminal open until the command is done (an EOF would end it).
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`roomcast user create` did not finish within {TIMEOUT:?}: it waits silently");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let mut shown = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut shown)
        .expect("read");
    (status.success(), shown)
}

#[tokio::test]
async fn user_create_prompts_for_the_password_on_a_terminal() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let (ok, shown) = user_create_on_a_terminal(
        &database.url,
        "ttyuser",
        "tulip-gravel-orbit\ntulip-gravel-orbit\n",
    );
    assert!(ok, "{shown}");
    assert!(shown.contains("Password for ttyuser:"), "{shown}");
    assert!(shown.contains("Repeat the password:"), "{shown}");
    assert!(shown.contains("created user ttyuser"), "{shown}");

    // Two different entries create nothing.
    let (ok, shown) = user_create_on_a_terminal(
        &database.url,
        "other",
        "tulip-gravel-orbit\ntulip-gravel-orbiT\n",
    );
    assert!(!ok, "{shown}");
    assert!(shown.contains("the passwords differ"), "{shown}");
}
