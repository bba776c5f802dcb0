//! Which browser requests the server takes: the guard against cross-site requests and DNS
//! rebinding, applied to every route before authentication.
//!
//! Without tokens the server trusts whoever reaches its loopback port, and any web page the
//! user opens reaches it too. A page can `POST` a `text/plain` body (no CORS preflight) or open
//! a WebSocket (no CORS at all). So:
//!
//! - A request with an `Origin` header is taken only when the origin is the server's own
//!   (`http[s]://` + the `Host` header) or one given with `--cors-origin`
//!   ([`ServerConfig::cors_origins`](super::ServerConfig::cors_origins)). Browsers send
//!   `Origin` on every cross-origin `fetch`, every `POST` and every WebSocket handshake.
//! - A request without `Origin` that a browser marks `Sec-Fetch-Site: cross-site` or
//!   `same-site` is taken only as a plain `GET`/`HEAD` (a navigation or a link), never as a
//!   write, a statement or a WebSocket upgrade.
//! - Without tokens, the `Host` must be an IP address, `localhost` or a `.localhost` name
//!   (unless [`ServerConfig::allow_any_host`](super::ServerConfig::allow_any_host)): a page on
//!   a domain that an attacker re-points at 127.0.0.1 sends its own name as `Host`.
//!
//! Clients that are not browsers (curl, the InfluxDB client libraries, Telegraf) send none of
//! these headers and are not affected. JSON bodies must also say `application/json`
//! (`body::read_json`), which a form or a `text/plain` fetch cannot.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;

/// Refuses the browser requests the module doc describes, with a 403 that says why and which
/// flag allows them.
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match check(&state, request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(message) => {
            tracing::warn!(target: "rivulet::audit", path = request.uri().path(), reason = %message, "browser request refused");
            ApiError::new(StatusCode::FORBIDDEN, message).into_response()
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Normalizes an origin for comparison: lowercase, no trailing `/`.
pub(crate) fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Whether `host` (a `Host` header: name or address, optional port) names this machine in a
/// way DNS cannot re-point.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]:8181`
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost")
}

fn check(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), String> {
    let config = &state.config;
    // Browsers always send `Host`; a client without one is not a browser.
    let host = header_str(headers, &header::HOST).unwrap_or("");
    let vetted = host.is_empty() && !headers.contains_key(header::HOST);
    if !config.auth.enabled() && !config.allow_any_host && !vetted && !local_host(host) {
        return Err(format!(
            "Host '{host}' is not an address of this server: without tokens only IP addresses, \
             localhost and .localhost names are served (a guard against DNS rebinding); \
             configure tokens (--token) to serve other names"
        ));
    }
    if let Some(origin) = header_str(headers, &header::ORIGIN).or_else(|| {
        // A header that is present but not text is treated as a foreign origin.
        headers.get(header::ORIGIN).map(|_| "")
    }) {
        let origin = normalize_origin(origin);
        let own = [format!("http://{host}"), format!("https://{host}")];
        let own = own.iter().any(|o| normalize_origin(o) == origin);
        if own
            || config
                .cors_origins
                .iter()
                .any(|o| normalize_origin(o) == origin)
        {
            return Ok(());
        }
        return Err(format!(
            "cross-origin request from '{origin}' refused: a web page on another origin may \
             not use this server; start it with --cors-origin {origin} to allow that page"
        ));
    }
    let site = header_str(headers, &header::HeaderName::from_static("sec-fetch-site"));
    let upgrade = headers.contains_key(header::UPGRADE);
    let plain_read = (method == Method::GET || method == Method::HEAD) && !upgrade;
    match site {
        Some("cross-site" | "same-site") if !plain_read => Err(
            "cross-site request refused: a browser marked it as sent by another site \
             (Sec-Fetch-Site); only plain GETs are taken from other sites"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::local_host;

    #[test]
    fn local_hosts_are_addresses_and_localhost_names() {
        for h in [
            "127.0.0.1:8181",
            "127.0.0.1",
            "[::1]:8181",
            "localhost:8181",
            "LOCALHOST",
            "app.localhost:3000",
            "10.0.0.5:8181",
            "localhost.",
        ] {
            assert!(local_host(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8181",
            "127.0.0.1.evil.example",
            "",
            "[evil]:80",
            "localhost.evil.example",
        ] {
            assert!(!local_host(h), "{h}");
        }
    }
}
