//! The examples under `examples/` run against a live server, as a reader would run
//! them (`cargo test` builds them next to the test binaries).

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Backend, TestServer};

/// `target/<profile>/examples/<name>`: the example binaries `cargo test` built.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    // `cargo test` builds the examples, but not when only some test targets were asked
    // for (`cargo test --test examples`), where an old build may be lying around:
    // build it (a no-op when it is up to date).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--example", name, "--manifest-path"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .status()
        .expect("run cargo build --example");
    assert!(status.success(), "cargo build --example {name} failed");
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Runs an example with `args`, killed (by its PID) after 60 s; answers its stdout.
async fn run_example(name: &str, args: &[&str]) -> String {
    let path = example(name);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait for the example").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("example {name} did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("the example's output");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "example {name} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    })
    .await
    .expect("the example runner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_client_example_runs() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let base = server.base_url();
    // Alice signs up, makes a room, sends and sees her message come back live.
    let out = run_example(
        "ws_client",
        &[&base, "alice", "correct horse battery staple"],
    )
    .await;
    assert!(out.contains("signed in as alice"), "{out}");
    assert!(out.contains("\"subscribed\""), "{out}");
    assert!(
        out.contains("message stored at seq 1 and delivered live"),
        "{out}"
    );
    let room_id = out
        .lines()
        .find_map(|l| l.strip_prefix("room "))
        .expect("the example prints its room")
        .to_owned();
    // Bob joins that room: he gets Alice's message from the history first, then his own.
    let out = run_example(
        "ws_client",
        &[&base, "bob", "another long passphrase", &room_id],
    )
    .await;
    assert!(out.contains("hello from alice"), "history replayed: {out}");
    assert!(out.contains("\"resumed\""), "{out}");
    assert!(
        out.contains("message stored at seq 2 and delivered live"),
        "{out}"
    );
    // Alice again: the account exists, so the example signs in.
    let out = run_example(
        "ws_client",
        &[&base, "alice", "correct horse battery staple", &room_id],
    )
    .await;
    assert!(out.contains("seq 3 and delivered live"), "{out}");
}
