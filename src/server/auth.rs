//! Bearer tokens with scopes, optionally limited to databases.
//!
//! A token is sent as `Authorization: Bearer <token>` or `Authorization: Token <token>` (the
//! InfluxDB client styles), or as the v1 `p` query parameter (`u` is ignored). Tokens are
//! compared in constant time. Every failed check is written to the audit log (the tracing target
//! `rivulet::audit`) with the client address, never the token.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything: writes, queries, statements, metrics.
    Admin,
    /// Writes (line protocol endpoints).
    Write,
    /// Queries.
    Read,
}

impl Scope {
    fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Read => "read",
        }
    }
}

/// A configured token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    secret: String,
    scope: Scope,
    /// `None` = every database.
    databases: Option<Vec<String>>,
    /// Names the token in quotas and logs without telling its secret (a hash prefix).
    id: Arc<str>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("scope", &self.scope)
            .field("databases", &self.databases)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for Token {
    type Err = String;

    /// `SCOPE:SECRET[:DB1,DB2…]`, e.g. `write:s3cr3t:main,metrics`.
    fn from_str(s: &str) -> Result<Token, String> {
        let mut parts = s.splitn(3, ':');
        let scope = match parts.next() {
            Some("admin") => Scope::Admin,
            Some("write") => Scope::Write,
            Some("read") => Scope::Read,
            other => {
                return Err(format!(
                    "token scope {:?} is not admin, write or read (format SCOPE:SECRET[:DB,…])",
                    other.unwrap_or("")
                ));
            }
        };
        let secret = parts.next().unwrap_or("").to_string();
        if secret.len() < 16 {
            return Err("a token secret must be at least 16 characters long".to_string());
        }
        let databases = match parts.next() {
            None => None,
            Some(dbs) => {
                let list: Vec<String> = dbs.split(',').map(str::to_string).collect();
                for d in &list {
                    if let Err(e) = crate::storage::catalog::check_database_name(d) {
                        return Err(format!(
                            "token database list: {e} (format SCOPE:SECRET[:DB,…]; a secret cannot contain ':')"
                        ));
                    }
                }
                Some(list)
            }
        };
        let id = token_id(&secret);
        Ok(Token {
            secret,
            scope,
            databases,
            id,
        })
    }
}

/// `token:` and the first 12 hex digits of the secret's SHA-256: a name for the token in
/// quotas and logs from which the secret cannot be recovered.
fn token_id(secret: &str) -> Arc<str> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(secret.as_bytes());
    let mut id = String::from("token:");
    for b in &digest[..6] {
        id.push_str(&format!("{b:02x}"));
    }
    id.into()
}

/// What an authorized request may touch.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    /// Databases the token is limited to; `None` = all.
    pub(crate) databases: Option<Vec<String>>,
    /// The token (None: authentication is off); quotas count per token.
    pub(crate) owner: Option<Arc<str>>,
}

/// The server's tokens; empty means authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<Token>,
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

impl Auth {
    /// Authentication with these tokens (none = off). Two tokens may not share a secret.
    pub fn new(tokens: Vec<Token>) -> Result<Auth, String> {
        for (i, a) in tokens.iter().enumerate() {
            if tokens[i + 1..].iter().any(|b| b.secret == a.secret) {
                return Err("two tokens have the same secret".to_string());
            }
        }
        Ok(Auth { tokens })
    }

    /// True when requests must carry a token.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks that the request may do `needed` on `db` (None: not database-specific).
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        v1_password: Option<&str>,
        needed: Scope,
        db: Option<&str>,
        peer: Option<SocketAddr>,
        what: &str,
    ) -> Result<Access, ApiError> {
        if !self.enabled() {
            return Ok(Access {
                databases: None,
                owner: None,
            });
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("Token "))
                    .map(str::trim)
            })
            .or(v1_password);
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        let Some(presented) = presented else {
            tracing::warn!(target: "rivulet::audit", %peer, what, "request without a token refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication required: send Authorization: Bearer <token>",
            ));
        };
        // Check every token so the time taken does not tell which one matched.
        let mut matched: Option<&Token> = None;
        for t in &self.tokens {
            if constant_time_eq(t.secret.as_bytes(), presented.as_bytes()) {
                matched = Some(t);
            }
        }
        let Some(token) = matched else {
            tracing::warn!(target: "rivulet::audit", %peer, what, "invalid token refused");
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"));
        };
        let db_ok = match (&token.databases, db) {
            (None, _) | (_, None) => true,
            (Some(list), Some(db)) => list.iter().any(|d| d == db),
        };
        if !token.scope.allows(needed) || !db_ok {
            tracing::warn!(
                target: "rivulet::audit", %peer, what, scope = token.scope.name(),
                needed = needed.name(), db = db.unwrap_or(""), "token lacks permission"
            );
            let on_db = db
                .map(|d| format!(" on database '{d}'"))
                .unwrap_or_default();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this token may not {}{on_db}", needed.name()),
            ));
        }
        Ok(Access {
            databases: token.databases.clone(),
            owner: Some(token.id.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_compare() {
        let t: Token = "write:0123456789abcdef:main,other".parse().expect("token");
        assert_eq!(t.scope, Scope::Write);
        assert_eq!(
            t.databases,
            Some(vec!["main".to_string(), "other".to_string()])
        );
        assert!("root:0123456789abcdef".parse::<Token>().is_err());
        assert!("read:short".parse::<Token>().is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }
}
