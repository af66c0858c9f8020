//! Opening Valkey: `redis://` in plaintext or `rediss://` over TLS (rustls, the system's
//! roots, or a private CA from `TOOLRANK_VALKEY_CA_FILE`), with an ACL user and password
//! in the URL (`rediss://user:password@host:6379`) or the password from the file
//! `TOOLRANK_VALKEY_PASSWORD_FILE`, so that it need not be in a URL at all. Every
//! command, the sink and the readers open Valkey here, so the variables hold everywhere.

use crate::Error;
use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates};
use std::time::Duration;

/// A PEM file of the CA that signed the server's certificate.
pub const CA_FILE_ENV: &str = "TOOLRANK_VALKEY_CA_FILE";
/// A file holding the ACL user's password (used when the URL has none).
pub const PASSWORD_FILE_ENV: &str = "TOOLRANK_VALKEY_PASSWORD_FILE";

/// Where a client connects, for messages: `host:port` and whether over TLS, never the
/// user or password.
pub fn endpoint(client: &redis::Client) -> String {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
        other => other.to_string(),
    }
}

fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A client for `url` with the CA and password files applied.
pub fn client(url: &str) -> Result<redis::Client, Error> {
    // The URL may hold a password: errors about it never quote it.
    let mut info = url
        .into_connection_info()
        .map_err(|e| Error::Settings(format!("the Valkey URL is not valid ({:?}): expected redis://[user[:password]@]host[:port] or rediss://…", e.kind())))?;
    if let Some(path) = setting(PASSWORD_FILE_ENV) {
        if info.redis_settings().password().is_none() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Settings(format!("{PASSWORD_FILE_ENV}: reading {path}: {e}")))?;
            let redis = info.redis_settings().clone().set_password(text.trim_end_matches(['\r', '\n']));
            info = info.set_redis_settings(redis);
        }
    }
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    match setting(CA_FILE_ENV) {
        Some(path) if tls => {
            let root = std::fs::read(&path).map_err(|e| Error::Settings(format!("{CA_FILE_ENV}: reading {path}: {e}")))?;
            Ok(redis::Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(root) })?)
        }
        Some(_) => Err(Error::Settings(format!("{CA_FILE_ENV} is set but the Valkey URL is not rediss:// (TLS)"))),
        None => Ok(redis::Client::open(info)?),
    }
}

/// Connects `client` within `timeout`; a failure names the endpoint.
pub fn connect(client: &redis::Client, timeout: Duration) -> Result<redis::Connection, Error> {
    client.get_connection_with_timeout(timeout).map_err(|e| Error::Connect { endpoint: endpoint(client), cause: e.to_string() })
}

/// When a first connection's error means the settings cannot work (rather than Valkey
/// being down), the cause with a hint: a TLS handshake that fails, a refused login, a
/// plaintext client on a TLS port (reset at the first command) or a TLS client on a
/// plaintext port (no handshake answer).
pub fn refusal(client: &redis::Client, cause: &str) -> Option<String> {
    let tls = matches!(client.get_connection_info().addr(), ConnectionAddr::TcpTls { .. });
    let has = |words: &[&str]| words.iter().any(|w| cause.contains(w));
    let hint = if has(&["WRONGPASS", "NOAUTH", "NOPERM", "AuthenticationFailed", "authentication failed"]) {
        "the ACL user and password go in the URL or TOOLRANK_VALKEY_PASSWORD_FILE"
    } else if has(&["certificate", "UnknownIssuer", "NotValidForName", "HandshakeFailure"]) {
        "the server's certificate is not trusted: a private CA goes in TOOLRANK_VALKEY_CA_FILE"
    } else if has(&["InvalidContentType", "corrupt message"]) || tls && has(&["os error 11", "timed out", "WouldBlock"]) {
        "no TLS answer: is this a plaintext port? (use redis:// there)"
    } else if !tls && has(&["reset by peer", "Broken pipe", "broken pipe"]) {
        "the server hangs up at the first command: is this a TLS port? (use rediss:// there)"
    } else {
        return None;
    };
    Some(format!("{cause} ({hint})"))
}
