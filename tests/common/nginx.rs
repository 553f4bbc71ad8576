//! A real nginx in front of test servers, running the repository's
//! `deploy/nginx/roomcast.conf` unchanged: the test writes only nginx's main file
//! (temp paths, pid and logs in a temp dir, `master_process off` so one process is
//! all there is to stop) and the two files roomcast.conf includes,
//! `roomcast-upstreams.conf` and `roomcast-listen.conf`. nginx listens on
//! 127.0.0.1 on a free port and is stopped by its PID when dropped.
//!
//! The binary comes from `ROOMCAST_TEST_NGINX` (scripts/test.sh installs nginx and
//! sets it), else `nginx` on the PATH or /usr/sbin/nginx. Without one the test
//! fails under CI (`CI=true` or `ROOMCAST_TEST_REQUIRE_POSTGRES=1`, which
//! scripts/test.sh sets) and is reported as skipped otherwise.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{report_skipped, REQUIRE_POSTGRES_ENV};

/// The environment variable naming the nginx binary.
pub const NGINX_ENV: &str = "ROOMCAST_TEST_NGINX";

/// How long nginx may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One nginx process and its temp dir.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

/// The nginx binary, if there is one (see the module docs); `None` after reporting
/// the test as skipped.
pub fn nginx_binary() -> Option<PathBuf> {
    let from_env = std::env::var(NGINX_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(PathBuf::from);
    let found = from_env.or_else(|| {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("nginx"))
            .find(|path| path.is_file())
    });
    if found.is_some() {
        return found;
    }
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !(flag("CI") || flag(REQUIRE_POSTGRES_ENV)),
        "nginx is not installed but the reverse-proxy tests are required; run them \
         through `bash scripts/test.sh`, which installs it"
    );
    report_skipped("nginx is not installed; run `bash scripts/test.sh` to include it");
    None
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Nginx {
    /// Starts nginx (from [`nginx_binary`]) proxying to `upstreams` round robin.
    pub fn start(binary: &Path, upstreams: &[SocketAddr]) -> Self {
        // A port picked by binding and letting go may be taken again before nginx
        // binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(binary, upstreams) {
                Ok(nginx) => return nginx,
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    fn try_start(binary: &Path, upstreams: &[SocketAddr]) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .map_err(|e| format!("{e}"))?;
        let path = |name: &str| dir.path().join(name);
        std::fs::create_dir_all(path("tmp")).map_err(|e| e.to_string())?;
        let servers: String = upstreams
            .iter()
            .map(|a| format!("server {a} max_fails=3 fail_timeout=5s;\n"))
            .collect();
        std::fs::write(path("roomcast-upstreams.conf"), servers).map_err(|e| e.to_string())?;
        std::fs::write(path("roomcast-listen.conf"), format!("listen {addr};\n"))
            .map_err(|e| e.to_string())?;
        let d = dir.path().display();
        let main = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   include {};\n\
             }}\n",
            repo_file("deploy/nginx/roomcast.conf").display()
        );
        std::fs::write(path("nginx.conf"), main).map_err(|e| e.to_string())?;
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(path("nginx.conf"))
            .arg("-e")
            .arg(path("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(path("error.log")).unwrap_or_default();
                return Err(format!("nginx exited with {status}: {log}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Self { child, dir, addr });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nginx did not listen on {addr} within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where nginx listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// nginx's error log so far (for assertion messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Our own child, by its PID; one process (master_process off).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
