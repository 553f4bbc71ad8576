//! The bundled web client: the files of `web/` are compiled into the binary and
//! served at `/` (`index.html`) and `/web/<file>`, so `roomcast serve` alone gives
//! a working chat page (docs/web-client.md). The page talks to the public API only
//! (Connect JSON over `fetch`, the WebSocket at `/ws`).
//!
//! Every answer carries `Cache-Control: no-cache` with a strong `ETag` (a browser
//! revalidates and gets `304` until the binary changes), `X-Content-Type-Options:
//! nosniff` and a Content-Security-Policy that allows scripts, styles, images and
//! connections (`fetch`, the WebSocket) from the server's own origin only. With
//! `web.enabled = false` these paths answer like any unknown path (404).

use std::sync::LazyLock;

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use crate::domain::AppState;

/// Where the client's files other than `index.html` are served.
pub const ASSET_PREFIX: &str = "/web/";

/// What the page may load: its own origin only. `connect-src 'self'` covers the
/// API and the same-origin WebSocket (CSP Level 3 matches `ws:`/`wss:` to `'self'`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; manifest-src 'self'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The files of `web/`, embedded at compile time.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/api.js"),
    },
    Asset {
        name: "live.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/live.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../web/favicon.svg"),
    },
];

/// A strong ETag per asset (the first 16 hex digits of its SHA-256), computed once.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            format!("\"{}\"", hex::encode(&digest[..8]))
        })
        .collect()
});

/// Mounts `/` and `/web/{file}` (GET and HEAD; other methods get 405).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/")
            .route(web::get().to(index))
            .route(web::head().to(index))
            .default_service(web::to(method_not_allowed)),
    );
    cfg.service(
        web::resource(format!("{ASSET_PREFIX}{{file}}"))
            .route(web::get().to(asset))
            .route(web::head().to(asset))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn index(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    serve(&req, &state, "index.html").await
}

async fn asset(
    req: HttpRequest,
    state: web::Data<AppState>,
    file: web::Path<String>,
) -> HttpResponse {
    serve(&req, &state, &file).await
}

async fn serve(req: &HttpRequest, state: &AppState, name: &str) -> HttpResponse {
    if !state.settings.web.enabled {
        return super::routes::unknown_rpc(req.clone()).await;
    }
    let Some(index) = ASSETS.iter().position(|asset| asset.name == name) else {
        return with_security_headers(HttpResponse::NotFound())
            .content_type("text/plain; charset=utf-8")
            .body("not found\n");
    };
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    if not_modified(req, etag) {
        return with_security_headers(HttpResponse::NotModified())
            .insert_header((header::ETAG, etag.as_str()))
            .finish();
    }
    with_security_headers(HttpResponse::Ok())
        .insert_header((header::ETAG, etag.as_str()))
        .content_type(asset.content_type)
        .body(asset.body)
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 asks) or `*`.
fn not_modified(req: &HttpRequest, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// The headers every answer of the web client carries.
fn with_security_headers(
    mut builder: actix_web::HttpResponseBuilder,
) -> actix_web::HttpResponseBuilder {
    builder
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    builder
}

async fn method_not_allowed(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !state.settings.web.enabled {
        return super::routes::unknown_rpc(req).await;
    }
    with_security_headers(HttpResponse::MethodNotAllowed())
        .insert_header((header::ALLOW, "GET, HEAD"))
        .content_type("text/plain; charset=utf-8")
        .body(format!("{} is not allowed here; use GET\n", req.method()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `index.html` loads only files that are embedded, from their served paths.
    #[test]
    fn index_references_only_embedded_files() {
        let index = std::str::from_utf8(ASSETS[0].body).expect("index.html is UTF-8");
        for part in index.split(ASSET_PREFIX).skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(
                ASSETS.iter().any(|asset| asset.name == name),
                "index.html refers to {ASSET_PREFIX}{name}, which is not embedded"
            );
        }
    }

    /// Every file of `web/` is embedded (a new module or stylesheet cannot be forgotten).
    #[test]
    fn every_file_of_web_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        for entry in std::fs::read_dir(&dir).expect("read web/") {
            let name = entry.expect("a web/ entry").file_name();
            let name = name.to_string_lossy();
            assert!(
                ASSETS.iter().any(|asset| asset.name == name),
                "web/{name} is not in ASSETS"
            );
        }
    }
}
