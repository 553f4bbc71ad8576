//! The bundled web client as a browser fetches it: `GET /` and the files under
//! `/web/`, with their content types, caching (`no-cache` + `ETag`, `304` on
//! revalidation) and security headers (nosniff, a same-origin-only CSP), and
//! `web.enabled = false` turning all of it into 404. The client itself runs in a
//! real Chromium in scripts/web-test.sh.

mod common;

use common::{Backend, TestServer};
use reqwest::{header, Method, StatusCode};

/// Headers every answer of the web client carries.
#[track_caller]
fn assert_security_headers(response: &reqwest::Response) {
    let headers = response.headers();
    let get = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{} has no {name} header", response.url()))
            .to_str()
            .expect("an ASCII header")
            .to_owned()
    };
    assert_eq!(get("x-content-type-options"), "nosniff");
    assert_eq!(get("cache-control"), "no-cache");
    let csp = get("content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(
            csp.split(';').any(|d| d.trim() == directive),
            "CSP {csp:?} lacks {directive:?}"
        );
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval") && !csp.contains('*'),
        "CSP {csp:?} allows more than the server's own origin"
    );
}

async fn get(server: &TestServer, path: &str) -> reqwest::Response {
    server
        .http()
        .get(server.url(path))
        .send()
        .await
        .expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_files_are_served_with_types_and_security_headers() {
    let server = TestServer::spawn(Backend::Sqlite).await;

    let index = get(&server, "/").await;
    assert_eq!(index.status(), StatusCode::OK);
    assert_security_headers(&index);
    assert_eq!(
        index.headers()[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    let html = index.text().await.expect("body");
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains(r#"<script type="module" src="/web/app.js">"#));
    assert!(
        !html.contains("<script>") && !html.contains(" style="),
        "inline scripts and styles would be refused by the CSP"
    );

    for (path, content_type, needle) in [
        ("/web/app.js", "text/javascript; charset=utf-8", "import"),
        (
            "/web/api.js",
            "text/javascript; charset=utf-8",
            "AuthService/Refresh",
        ),
        (
            "/web/live.js",
            "text/javascript; charset=utf-8",
            "roomcast.v1.json",
        ),
        ("/web/style.css", "text/css; charset=utf-8", "@media"),
        ("/web/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let response = get(&server, path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_security_headers(&response);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            content_type,
            "{path}"
        );
        assert!(response.headers().contains_key(header::ETAG), "{path}");
        let body = response.text().await.expect("body");
        assert!(body.contains(needle), "{path} does not contain {needle:?}");
    }

    // The API and the WebSocket paths are untouched by the client's routes.
    let (status, _) = server
        .rpc()
        .call_json("UserService/GetMe", serde_json::json!({}))
        .await;
    assert_eq!(status, 401);

    let missing = get(&server, "/web/nope.js").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_security_headers(&missing);
    assert_eq!(
        missing.headers()[header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );

    let post = server
        .http()
        .post(server.url("/"))
        .send()
        .await
        .expect("POST /");
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");

    let head = server
        .http()
        .request(Method::HEAD, server.url("/web/app.js"))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), StatusCode::OK);
    assert_security_headers(&head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_etag_gets_304_and_another_gets_the_file() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let first = get(&server, "/web/app.js").await;
    let etag = first.headers()[header::ETAG]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let body = first.bytes().await.expect("body");

    for if_none_match in [etag.clone(), format!("W/{etag}"), format!("\"x\", {etag}")] {
        let again = server
            .http()
            .get(server.url("/web/app.js"))
            .header(header::IF_NONE_MATCH, &if_none_match)
            .send()
            .await
            .expect("GET");
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{if_none_match}");
        assert_eq!(again.headers()[header::ETAG], etag.as_str());
        assert_security_headers(&again);
        assert!(again.bytes().await.expect("body").is_empty());
    }

    let stale = server
        .http()
        .get(server.url("/web/app.js"))
        .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
        .send()
        .await
        .expect("GET");
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(stale.bytes().await.expect("body"), body);

    // Each file has its own tag.
    let index = get(&server, "/").await;
    assert_ne!(index.headers()[header::ETAG], etag.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_enabled_false_serves_nothing() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| s.web.enabled = false).await;
    for path in ["/", "/web/app.js", "/web/style.css", "/web/nope.js"] {
        let response = get(&server, path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            !response.headers().contains_key("content-security-policy"),
            "{path}"
        );
        let body = response.text().await.expect("body");
        assert!(!body.contains("<!doctype html>"), "{path}: {body}");
    }
    let post = server
        .http()
        .post(server.url("/"))
        .send()
        .await
        .expect("POST /");
    assert_eq!(post.status(), StatusCode::NOT_FOUND);
    // The rest of the server is unchanged.
    let health = get(&server, "/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
}
