//! The `roomcast` binary and its configuration, as an operator uses them: the
//! documented defaults, `config check`, errors naming bad keys, environment
//! overrides, masked secrets, `migrate`, `user create`, and `serve` with a clean
//! exit on SIGTERM.

mod common;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{TestDatabase, PASSWORD};
use figment::providers::Env;
use roomcast::{proto::v1 as pb, settings::Settings};
use serde_json::json;

/// The binary under test.
const ROOMCAST: &str = env!("CARGO_BIN_EXE_roomcast");
/// How long `serve` may take to answer /healthz, and to exit after SIGTERM.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// An environment provider no variable matches, so the developer's own
/// `ROOMCAST_*` variables cannot change what these tests load.
fn no_env() -> Env {
    Env::prefixed("ROOMCAST_CONFIG_TEST_IGNORES_ENV_")
}

/// `roomcast` with a clean environment (no `ROOMCAST_*` but `env`), run in a
/// temp dir so the default `./data` never lands in the repository.
fn roomcast(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(ROOMCAST);
    command.current_dir(cwd).args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("ROOMCAST_") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG");
    command.envs(env.iter().copied());
    command
}

fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    roomcast(cwd, args, env)
        .stdin(Stdio::null())
        .output()
        .expect("run roomcast")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("roomcast-config-test-")
        .tempdir()
        .expect("temp dir")
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write the config file");
    path
}

/// Runs `config check` with `file` and answers the failure's stderr; asserts it
/// failed with exit status 2 and named everything in `needles`.
#[track_caller]
fn check_fails(dir: &Path, file_contents: &str, env: &[(&str, &str)], needles: &[&str]) -> String {
    let file = write(dir, "roomcast.toml", file_contents);
    let output = run(
        dir,
        &[
            "config",
            "check",
            "--config",
            file.to_str().expect("utf-8 path"),
        ],
        env,
    );
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "config check should fail for:\n{file_contents}\nstdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr should name `{needle}`: {stderr}"
        );
    }
    stderr
}

// ---------------------------------------------------------------------------
// config/default.toml and config/test.toml
// ---------------------------------------------------------------------------

#[test]
fn default_toml_documents_exactly_the_built_in_defaults() {
    let path = repo_file("config/default.toml");
    let loaded = Settings::load_from(Some(&path), no_env()).expect("config/default.toml loads");
    let built_in = Settings::default();
    assert_eq!(
        toml::to_string(&loaded).expect("serialize"),
        toml::to_string(&built_in).expect("serialize"),
        "config/default.toml and Settings::default() disagree"
    );
    // Every key is written out (not merely defaulted), with the default value.
    let file: toml::Value = toml::from_str(&std::fs::read_to_string(&path).expect("read"))
        .expect("config/default.toml is TOML");
    let expected = toml::Value::try_from(&built_in).expect("settings as TOML");
    let (file, expected) = (flatten(&file), flatten(&expected));
    let mut problems = Vec::new();
    for (key, value) in &expected {
        match file.get(key) {
            None => problems.push(format!("missing: {key} = {value}")),
            Some(found) if found != value => {
                problems.push(format!("{key} = {found}, but the default is {value}"))
            }
            Some(_) => {}
        }
    }
    problems.extend(
        file.keys()
            .filter(|key| !expected.contains_key(*key))
            .map(|key| format!("not a setting: {key}")),
    );
    assert!(
        problems.is_empty(),
        "config/default.toml is out of sync with src/settings.rs:\n  {}",
        problems.join("\n  ")
    );
}

/// `{a = {b = 1}}` → `{"a.b": 1}`.
fn flatten(value: &toml::Value) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(
        prefix: &str,
        value: &toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", value, &mut out);
    out
}

#[test]
fn every_key_in_default_toml_has_a_comment() {
    let contents = std::fs::read_to_string(repo_file("config/default.toml")).expect("read");
    let mut previous = "";
    for line in contents.lines() {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.starts_with('[') {
            let key = trimmed.split('=').next().unwrap_or_default().trim();
            assert!(
                previous.starts_with('#'),
                "key `{key}` in config/default.toml has no comment line above it"
            );
        }
        previous = trimmed;
    }
}

#[test]
fn test_toml_loads_and_is_cheap() {
    let path = repo_file("config/test.toml");
    let settings = Settings::load_from(Some(&path), no_env()).expect("config/test.toml loads");
    assert_eq!(settings.server.listen.port(), 0);
    assert!(settings.auth.argon2_memory_kib < Settings::default().auth.argon2_memory_kib);
}

// ---------------------------------------------------------------------------
// config check
// ---------------------------------------------------------------------------

#[test]
fn config_check_without_a_file_prints_the_defaults() {
    let dir = temp_dir();
    let output = run(dir.path(), &["config", "check"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: toml::Value = toml::from_str(&text(&output.stdout)).expect("the output is TOML");
    let expected = toml::Value::try_from(Settings::default()).expect("settings as TOML");
    assert_eq!(printed, expected);
    assert!(
        !dir.path().join("data").exists(),
        "config check must not create the database"
    );
}

#[test]
fn unknown_keys_are_errors_naming_the_key_and_the_file() {
    let dir = temp_dir();
    check_fails(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:9000\"\nlisen = \"typo\"\n",
        &[],
        &["server.lisen", "roomcast.toml", "listen"],
    );
    check_fails(
        dir.path(),
        "[servr]\nworkers = 2\n",
        &[],
        &["servr", "roomcast.toml"],
    );
    check_fails(
        dir.path(),
        "[auth.external]\nalgo = \"RS256\"\n",
        &[],
        &["auth.external.algo"],
    );
    check_fails(dir.path(), "verbose = true\n", &[], &["verbose"]);
}

#[test]
fn bad_values_are_errors_naming_the_key() {
    let dir = temp_dir();
    for (contents, key) in [
        ("[server]\nlisten = \"nope\"\n", "server.listen"),
        ("[server]\nworkers = \"x\"\n", "server.workers"),
        (
            "[server]\nmax_request_bytes = -1\n",
            "server.max_request_bytes",
        ),
        (
            "[cors]\nallowed_origins = \"https://a.example\"\n",
            "cors.allowed_origins",
        ),
        (
            "[store]\nmigrate_on_start = \"yes\"\n",
            "store.migrate_on_start",
        ),
        ("[store]\nurl = \"mysql://db/roomcast\"\n", "store.url"),
        (
            "[store]\nsqlite_synchronous = \"off\"\n",
            "store.sqlite_synchronous",
        ),
        ("[auth]\ntoken_secret = \"short\"\n", "auth.token_secret"),
        ("[auth]\nsign_up_role = \"admin\"\n", "auth.sign_up_role"),
        ("[auth]\nadmin_username = \"root\"\n", "auth.admin_password"),
        (
            "[auth.external]\nenabled = true\nalgorithm = \"HS512\"\n",
            "auth.external.algorithm",
        ),
        (
            "[auth.external]\nenabled = true\nalgorithm = \"RS256\"\n",
            "auth.external.public_key_pem",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[server\nlisten = 1\n", "roomcast.toml"),
    ] {
        check_fails(dir.path(), contents, &[], &[key]);
    }
}

#[test]
fn a_missing_config_file_is_an_error_naming_it() {
    let dir = temp_dir();
    let output = run(
        dir.path(),
        &["--config", "does-not-exist.toml", "config", "check"],
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("does-not-exist.toml"));
}

#[test]
fn environment_variables_override_the_file() {
    let dir = temp_dir();
    let file = write(
        dir.path(),
        "roomcast.toml",
        "[server]\nlisten = \"127.0.0.1:9000\"\nworkers = 3\n[cors]\nallowed_origins = [\"https://a.example\"]\n",
    );
    let file = file.to_str().expect("utf-8 path");
    let output = run(
        dir.path(),
        &["config", "check", "--config", file],
        &[
            ("ROOMCAST_SERVER__LISTEN", "0.0.0.0:9999"),
            ("ROOMCAST_AUTH__EXTERNAL__ISSUER", "my-app"),
            ("ROOMCAST_LOG__FORMAT", "json"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: toml::Value = toml::from_str(&text(&output.stdout)).expect("TOML");
    assert_eq!(printed["server"]["listen"].as_str(), Some("0.0.0.0:9999"));
    assert_eq!(
        printed["server"]["workers"].as_integer(),
        Some(3),
        "from the file"
    );
    assert_eq!(
        printed["auth"]["external"]["issuer"].as_str(),
        Some("my-app")
    );
    assert_eq!(printed["log"]["format"].as_str(), Some("json"));
    assert_eq!(
        printed["cors"]["allowed_origins"][0].as_str(),
        Some("https://a.example")
    );

    // The config file can come from ROOMCAST_CONFIG too.
    let output = run(
        dir.path(),
        &["config", "check"],
        &[("ROOMCAST_CONFIG", file)],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("listen = \"127.0.0.1:9000\""));

    // Other ROOMCAST_ variables (tooling, no `__`) are not configuration.
    let output = run(
        dir.path(),
        &["config", "check"],
        &[("ROOMCAST_TEST_POSTGRES_URL", "postgres://x@y/z")],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
}

#[test]
fn list_values_can_be_given_in_environment_variables() {
    let dir = temp_dir();
    // As documented in config/default.toml and the README: a TOML-like array.
    for (value, expected) in [
        (
            r#"["https://a.example", "https://b.example"]"#,
            vec!["https://a.example", "https://b.example"],
        ),
        (r#"["https://only.example"]"#, vec!["https://only.example"]),
        ("[]", vec![]),
    ] {
        let output = run(
            dir.path(),
            &["config", "check"],
            &[("ROOMCAST_CORS__ALLOWED_ORIGINS", value)],
        );
        assert!(output.status.success(), "{value}: {}", text(&output.stderr));
        let printed: toml::Value = toml::from_str(&text(&output.stdout)).expect("TOML");
        let origins: Vec<&str> = printed["cors"]["allowed_origins"]
            .as_array()
            .unwrap_or_else(|| panic!("{value}: allowed_origins is a list"))
            .iter()
            .map(|v| v.as_str().expect("a string"))
            .collect();
        assert_eq!(origins, expected, "from {value}");
    }
    // A bare string where a list is expected is an error naming the variable.
    let output = run(
        dir.path(),
        &["config", "check"],
        &[("ROOMCAST_CORS__ALLOWED_ORIGINS", "https://a.example")],
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("cors.allowed_origins")
            && stderr.contains("ROOMCAST_CORS__ALLOWED_ORIGINS"),
        "{stderr}"
    );
}

#[test]
fn bad_environment_values_are_errors_naming_the_key_and_the_variable() {
    let dir = temp_dir();
    let output = run(
        dir.path(),
        &["config", "check"],
        &[("ROOMCAST_SERVER__WORKERS", "lots")],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("server.workers"), "{stderr}");
    assert!(stderr.contains("ROOMCAST_SERVER__WORKERS"), "{stderr}");

    let output = run(
        dir.path(),
        &["config", "check"],
        &[("ROOMCAST_SERVR__WORKERS", "3")],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("servr"), "{stderr}");
    assert!(stderr.contains("ROOMCAST_SERVR__WORKERS"), "{stderr}");
}

#[test]
fn config_check_masks_secrets() {
    let dir = temp_dir();
    let token_secret = "token-secret-token-secret-token-secret-42";
    let external_secret = "external-secret-external-secret-external-7";
    let file = write(
        dir.path(),
        "roomcast.toml",
        &format!(
            "[store]\nurl = \"postgres://roomcast:db-password-123@db.example:5432/roomcast\"\n\
             [auth]\ntoken_secret = \"{token_secret}\"\nadmin_username = \"root\"\n\
             admin_password = \"admin-password-456\"\n\
             [auth.external]\nenabled = true\nsecret = \"{external_secret}\"\n"
        ),
    );
    let output = run(
        dir.path(),
        &["config", "check", "--config", file.to_str().expect("utf-8")],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for secret in [
        token_secret,
        external_secret,
        "admin-password-456",
        "db-password-123",
    ] {
        assert!(!stdout.contains(secret), "`{secret}` is printed:\n{stdout}");
    }
    let printed: toml::Value = toml::from_str(&stdout).expect("TOML");
    assert_eq!(printed["auth"]["token_secret"].as_str(), Some("********"));
    assert_eq!(printed["auth"]["admin_password"].as_str(), Some("********"));
    assert_eq!(
        printed["auth"]["external"]["secret"].as_str(),
        Some("********")
    );
    assert_eq!(
        printed["store"]["url"].as_str(),
        Some("postgres://roomcast:********@db.example:5432/roomcast")
    );
    // What is not secret stays readable.
    assert_eq!(printed["auth"]["admin_username"].as_str(), Some("root"));
}

#[test]
fn version_and_help() {
    let dir = temp_dir();
    let output = run(dir.path(), &["--version"], &[]);
    assert!(output.status.success());
    assert!(text(&output.stdout).contains(env!("CARGO_PKG_VERSION")));
    let output = run(dir.path(), &["--help"], &[]);
    assert!(output.status.success());
    let help = text(&output.stdout);
    for command in ["serve", "migrate", "config", "user", "--config"] {
        assert!(
            help.contains(command),
            "--help should mention {command}: {help}"
        );
    }
}

// ---------------------------------------------------------------------------
// migrate, user create, serve
// ---------------------------------------------------------------------------

/// A `roomcast serve` child process, killed (by its PID) if the test ends early.
struct ServeProcess {
    child: Child,
    base_url: String,
    /// Its stderr (the log), a file so a chatty server never blocks on a pipe.
    log: PathBuf,
}

impl ServeProcess {
    /// Starts `roomcast serve` on a free loopback port with `store.url = url`,
    /// and waits (bounded) until /healthz answers.
    async fn start(cwd: &Path, url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let log = cwd.join("serve.log");
        let log_file = std::fs::File::create(&log).expect("create the log file");
        let child = roomcast(
            cwd,
            &["serve"],
            &[
                ("ROOMCAST_SERVER__LISTEN", &listen),
                ("ROOMCAST_SERVER__WORKERS", "1"),
                ("ROOMCAST_STORE__URL", url),
                ("ROOMCAST_AUTH__ARGON2_MEMORY_KIB", "1024"),
                ("ROOMCAST_AUTH__ARGON2_ITERATIONS", "1"),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn roomcast serve");
        let mut process = Self {
            child,
            base_url: format!("http://{listen}"),
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + SERVE_TIMEOUT;
        loop {
            if let Ok(response) = http
                .get(format!("{}/healthz", process.base_url))
                .send()
                .await
            {
                if response.status().is_success() {
                    return process;
                }
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "roomcast serve exited early ({status}): {}",
                    process.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "roomcast serve did not answer /healthz within {SERVE_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + SERVE_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "roomcast serve did not exit within {SERVE_TIMEOUT:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn user_create(cwd: &Path, url: &str, args: &[&str], password: &str) -> Output {
    let mut full = vec!["user", "create"];
    full.extend_from_slice(args);
    let mut child = roomcast(
        cwd,
        &full,
        &[
            ("ROOMCAST_STORE__URL", url),
            ("ROOMCAST_AUTH__ARGON2_MEMORY_KIB", "1024"),
            ("ROOMCAST_AUTH__ARGON2_ITERATIONS", "1"),
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn roomcast user create");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    child.wait_with_output().expect("wait")
}

both_backends!(
    migrate_applies_the_schema_idempotently,
    |backend| async move {
        let database = TestDatabase::create(backend).await;
        let cwd = temp_dir();
        for _ in 0..2 {
            let output = run(
                cwd.path(),
                &["migrate"],
                &[("ROOMCAST_STORE__URL", &database.url)],
            );
            assert!(output.status.success(), "{}", text(&output.stderr));
            assert!(text(&output.stdout).contains("migrations applied"));
        }
        if let Some(dir) = database.dir() {
            assert!(dir.join("roomcast.db").exists());
        }
        // An unreachable database is a clear failure, not a hang.
        let output = run(
            cwd.path(),
            &["migrate"],
            &[
                ("ROOMCAST_STORE__URL", "postgres://nobody@127.0.0.1:1/none"),
                ("ROOMCAST_STORE__ACQUIRE_TIMEOUT_MS", "2000"),
            ],
        );
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("roomcast:"),
            "{}",
            text(&output.stderr)
        );
    }
);

both_backends!(
    user_create_admin_then_sign_in_over_http,
    |backend| async move {
        let database = TestDatabase::create(backend).await;
        let cwd = temp_dir();
        let output = user_create(
            cwd.path(),
            &database.url,
            &[
                "--admin",
                "--username",
                "Root",
                "--password-stdin",
                "--display-name",
                "The Root",
            ],
            PASSWORD,
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        let stdout = text(&output.stdout);
        assert!(
            stdout.contains("root") && stdout.contains("admin"),
            "{stdout}"
        );
        // The same name again is refused, and so is a bad name.
        let output = user_create(
            cwd.path(),
            &database.url,
            &["--username", "root", "--password-stdin"],
            PASSWORD,
        );
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("taken"),
            "{}",
            text(&output.stderr)
        );
        let output = user_create(
            cwd.path(),
            &database.url,
            &["--username", "no way", "--password-stdin"],
            PASSWORD,
        );
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("username"),
            "{}",
            text(&output.stderr)
        );
        let output = user_create(
            cwd.path(),
            &database.url,
            &["--username", "shorty", "--password-stdin"],
            "short",
        );
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("password"),
            "{}",
            text(&output.stderr)
        );

        let mut server = ServeProcess::start(cwd.path(), &database.url).await;
        let http = reqwest::Client::new();
        let response = http
            .post(format!(
                "{}/roomcast.v1.AuthService/SignIn",
                server.base_url
            ))
            .json(&json!({"username": "root", "password": PASSWORD}))
            .send()
            .await
            .expect("SignIn");
        assert_eq!(response.status().as_u16(), 200);
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["user"]["role"], "ROLE_ADMIN");
        assert_eq!(body["user"]["displayName"], "The Root");
        let token = body["tokens"]["accessToken"]
            .as_str()
            .expect("token")
            .to_owned();
        // The admin may call admin RPCs.
        let response = http
            .post(format!(
                "{}/roomcast.v1.AuthService/CreateApiKey",
                server.base_url
            ))
            .bearer_auth(&token)
            .header("content-type", "application/proto")
            .body(prost::Message::encode_to_vec(&pb::CreateApiKeyRequest {
                name: "ci".into(),
            }))
            .send()
            .await
            .expect("CreateApiKey");
        assert_eq!(response.status().as_u16(), 200);
        let created: pb::CreateApiKeyResponse =
            prost::Message::decode(response.bytes().await.expect("body")).expect("protobuf");
        assert!(created.secret.starts_with("rk_"));
        let status = server.terminate().await;
        assert!(status.success(), "serve exited with {status}");
    }
);

#[tokio::test]
async fn serve_exits_cleanly_and_promptly_on_sigterm() {
    let cwd = temp_dir();
    let url = format!("sqlite://{}/data/roomcast.db", cwd.path().display());
    let mut server = ServeProcess::start(cwd.path(), &url).await;
    let ready = reqwest::get(format!("{}/readyz", server.base_url))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    let started = Instant::now();
    let status = server.terminate().await;
    assert!(
        status.success(),
        "serve exited with {status}: {}",
        server.stderr()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an idle server took {:?} to stop",
        started.elapsed()
    );
    assert!(cwd.path().join("data/roomcast.db").exists());
}

#[tokio::test]
async fn logs_written_to_a_file_carry_no_colour_codes() {
    let cwd = temp_dir();
    let url = format!("sqlite://{}/data/roomcast.db", cwd.path().display());
    let mut server = ServeProcess::start(cwd.path(), &url).await;
    // A request, so that the log has a request line with fields too.
    let _ = reqwest::get(format!("{}/readyz", server.base_url)).await;
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.stderr());
    let log = server.stderr();
    assert!(log.contains("roomcast listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file must not carry ANSI escape codes:\n{log:?}"
    );
}

#[tokio::test]
async fn serve_refuses_to_start_on_a_bad_config() {
    let cwd = temp_dir();
    let output = run(
        cwd.path(),
        &["serve"],
        &[("ROOMCAST_SERVER__LISTEN", "not-an-address")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("server.listen"));
    // A port that is taken is a clear start-up error too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let output = run(
        cwd.path(),
        &["serve"],
        &[
            ("ROOMCAST_SERVER__LISTEN", &listen),
            (
                "ROOMCAST_STORE__URL",
                &format!("sqlite://{}/x.db", cwd.path().display()),
            ),
        ],
    );
    assert!(!output.status.success());
    // The message names the address and the setting to change.
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&listen) && stderr.contains("server.listen"),
        "{stderr}"
    );
    // Nothing touched the default ./data.
    assert!(!cwd.path().join("data").exists());
}
