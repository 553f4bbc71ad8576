//! The test harness itself, as the person running the tests sees it: a PostgreSQL test
//! without a database is reported as skipped on the console (never a silent pass),
//! and is a failure where PostgreSQL is required (CI, scripts/test.sh).
//!
//! Each check runs this very test binary again as a child process, with a filter
//! that selects only the `probe` tests below, and reads the child's console output
//! (the harness captures a passing test's `eprintln!`, which is how skips used to
//! vanish).

mod common;

use std::process::{Command, Output};

use common::{POSTGRES_URL_ENV, REQUIRE_POSTGRES_ENV};

/// Set in the child, so that the checks below do not run recursively.
const CHILD_ENV: &str = "ROOMCAST_TEST_HARNESS_CHILD";

// The probe: a `both_backends!` pair whose body does nothing, so it costs nothing in
// the normal run and only shows how a PostgreSQL test reports itself.
both_backends!(probe, |_backend| async move {});

/// Runs this test binary on the `probe::postgres` test only, with the given
/// environment on top of one where PostgreSQL is not configured.
fn run_probe(env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    // Two threads: libtest names the test's thread after the test only when it
    // does not run tests on the main thread.
    command
        .args(["--exact", "probe::postgres", "--test-threads=2"])
        .env(CHILD_ENV, "1")
        .env_remove(POSTGRES_URL_ENV)
        .env_remove(REQUIRE_POSTGRES_ENV)
        .env_remove("CI")
        .env_remove("RUST_TEST_NOCAPTURE");
    command.envs(env.iter().copied());
    command.output().expect("run the test binary")
}

fn console(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

#[test]
fn a_postgres_test_without_a_database_is_reported_as_skipped() {
    if is_child() {
        return;
    }
    let output = run_probe(&[]);
    let console = console(&output);
    assert!(output.status.success(), "{console}");
    // The skip is on the console although the harness captured the test's output.
    let skipped: Vec<&str> = console
        .lines()
        .filter(|line| line.starts_with("SKIPPED "))
        .collect();
    assert_eq!(
        skipped.len(),
        1,
        "exactly one SKIPPED line for the one skipped test:\n{console}"
    );
    assert!(
        skipped[0].contains("probe::postgres") && skipped[0].contains(POSTGRES_URL_ENV),
        "the line names the test and what is missing: {}",
        skipped[0]
    );
}

#[test]
fn a_postgres_test_without_a_database_fails_where_postgres_is_required() {
    if is_child() {
        return;
    }
    for env in [("CI", "true"), (REQUIRE_POSTGRES_ENV, "1")] {
        let output = run_probe(&[env]);
        let console = console(&output);
        assert!(
            !output.status.success(),
            "with {}={} a missing PostgreSQL must fail the run:\n{console}",
            env.0,
            env.1
        );
        assert!(
            console.contains(POSTGRES_URL_ENV) && console.contains("probe::postgres"),
            "the failure names the test and the variable:\n{console}"
        );
    }
}
