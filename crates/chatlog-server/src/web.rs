//! The browser client (`web/public/`), compiled into the binary so that a fresh machine serves
//! it with nothing but `cargo run --release -p chatlog-server`: the page at `/`, its scripts
//! and styles at `/web/{file}`. The page speaks only the public protocol (WebSocket `/v1/ws`,
//! files over `/v1/files`).
//!
//! One more route exists for the no-argument dev run only: `POST /v1/dev/token` mints a token
//! for any user, so a person trying the server can sign in as two users in two tabs. It answers
//! 404 unless [`ServerConfig::dev_tokens`](crate::ServerConfig::dev_tokens) is on (the binary
//! turns it on only when started with no arguments, a generated secret and a loopback listen
//! address), and 403 unless the request's `Host` is a loopback name, so a web page elsewhere
//! cannot reach it through DNS rebinding.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::App;

/// One file of the client.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// The page itself (served at `/`).
const INDEX_HTML: &str = include_str!("../../../web/public/index.html");

/// Everything the page loads, served at `/web/{name}`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../../web/public/app.js"),
    },
    Asset {
        name: "client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../../web/public/client.js"),
    },
    Asset {
        name: "model.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../../web/public/model.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../../web/public/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../../../web/public/icon.svg"),
    },
];

/// The page may load its own files, talk to its own origin (`connect-src 'self'` covers the
/// same-origin WebSocket) and show images it fetched itself as `blob:` URLs; nothing inline,
/// nothing from elsewhere, never framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Lifetime of a dev token.
const DEV_TOKEN_TTL_SECS: u64 = 24 * 60 * 60;
/// Largest dev token request body.
const DEV_TOKEN_REQUEST_BYTES_MAX: usize = 1024;

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The files change with the binary; a browser revalidates instead of keeping an
            // old script next to a new server.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /web/{name}`: a script, style sheet or icon of the page.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => page(a.content_type, a.body),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Whether a `Host` header names this machine (`127.0.0.1`, `[::1]`, `localhost`, any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `POST /v1/dev/token` with `{"user": U}` → `{"user": U, "token": T, "exp": secs}`; only in
/// the dev run (see the module docs).
pub async fn dev_token(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if !app.config.dev_tokens {
        return json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    if !loopback_host(&headers) {
        return json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "dev tokens are only handed out to http://127.0.0.1 or http://localhost",
        );
    }
    if body.len() > DEV_TOKEN_REQUEST_BYTES_MAX {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "body too large");
    }
    #[derive(serde::Deserialize)]
    struct DevTokenRequest {
        user: String,
    }
    let request: DevTokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("expected {{\"user\": \"...\"}}: {e}"),
            );
        }
    };
    if let Err(e) = chatlog::engine::types::check_user(&request.user) {
        return json_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string());
    }
    let exp = crate::auth::secs(app.now_ms()) + DEV_TOKEN_TTL_SECS;
    let token = app.auth.sign(&request.user, exp);
    axum::Json(serde_json::json!({"user": request.user, "token": token, "exp": exp}))
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn loopback_host_accepts_only_names_of_this_machine() {
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(super::loopback_host(&host(ok)), "{ok}");
        }
        for refused in [
            "example.com",
            "example.com:8080",
            "10.0.0.1:8080",
            "localhost.example.com",
            "127.0.0.1.nip.io:8080",
            "[::2]:80",
            "",
        ] {
            assert!(!super::loopback_host(&host(refused)), "{refused}");
        }
        assert!(!super::loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn every_asset_the_page_names_is_served() {
        for asset in super::ASSETS {
            assert!(!asset.body.is_empty(), "{}", asset.name);
        }
        // Every `/web/...` reference in the page and the scripts resolves to an asset.
        let sources =
            std::iter::once(super::INDEX_HTML).chain(super::ASSETS.iter().map(|a| a.body));
        for source in sources {
            for (at, _) in source.match_indices("/web/") {
                let rest = &source[at + "/web/".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    super::ASSETS.iter().any(|a| a.name == name),
                    "/web/{name} is referenced but not served"
                );
            }
        }
    }
}
