//! Opening Valkey: `redis://` in plaintext or `rediss://` over TLS (rustls, the system's
//! roots, or a private CA from `TOOLRANK_VALKEY_CA_FILE`), with an ACL user and password
//! in the URL (`rediss://user:password@host:6379`) or the password from the file
//! `TOOLRANK_VALKEY_PASSWORD_FILE`, so that it need not be in a URL at all. Every
//! command, the sink and the readers open Valkey here, so the variables hold everywhere.

use crate::{cluster, Error};
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

/// One Valkey deployment: a server, or a cluster reached through the node in the URL.
/// Whether it is a cluster is found at the first connection.
pub struct Valkey {
    seed: redis::Client,
    cluster: Option<bool>,
}

impl Valkey {
    pub fn open(url: &str) -> Result<Valkey, Error> {
        Ok(Valkey { seed: client(url)?, cluster: None })
    }

    /// The URL's node, for messages.
    pub fn endpoint(&self) -> String {
        endpoint(&self.seed)
    }

    /// [`refusal`] for this deployment's URL.
    pub fn refusal(&self, cause: &str) -> Option<String> {
        refusal(&self.seed, cause)
    }

    /// The key prefix of namespace `name` here: the name, or in a cluster its hash tag.
    pub fn key_prefix(&self, name: &str) -> String {
        cluster::key_prefix(name, self.cluster == Some(true))
    }

    /// Whether it is a cluster, once a connection found out.
    pub fn cluster(&self) -> Option<bool> {
        self.cluster
    }

    /// A connection to the node that serves `key` (the server itself when not a cluster),
    /// within `timeout` per connection.
    pub fn connection_for(&mut self, key: &str, timeout: Duration) -> Result<redis::Connection, Error> {
        let mut conn = connect(&self.seed, timeout)?;
        let failed = |e: redis::RedisError, endpoint: String| Error::Connect { endpoint, cause: e.to_string() };
        let cluster = match self.cluster {
            Some(known) => known,
            None => *self.cluster.insert(cluster::enabled(&mut conn).map_err(|e| failed(e, self.endpoint()))?),
        };
        if !cluster {
            return Ok(conn);
        }
        let slot = cluster::slot(key);
        let (host, port) = cluster::owner(&mut conn, slot).map_err(|e| failed(e, self.endpoint()))?.ok_or_else(|| Error::Connect {
            endpoint: self.endpoint(),
            cause: format!("no node serves slot {slot} (is the cluster's every slot assigned?)"),
        })?;
        let node = redis::Client::open(cluster::at(self.seed.get_connection_info(), host, port))?;
        if endpoint(&node) == self.endpoint() {
            return Ok(conn);
        }
        connect(&node, timeout)
    }
}

/// How long a reader follows a slot that is moving before it gives up.
const FOLLOW_FOR: Duration = Duration::from_secs(30);

/// A connection to the node serving `key` that follows the key when its slot moves: an
/// answer `MOVED`, `ASK`, `TRYAGAIN` or `CLUSTERDOWN` makes it ask the cluster for the
/// owner again and send the command again (readers only: a read is safe to repeat).
pub struct Following {
    valkey: Valkey,
    key: String,
    timeout: Duration,
    conn: redis::Connection,
}

impl Following {
    pub fn new(mut valkey: Valkey, key: &str, timeout: Duration) -> Result<Following, Error> {
        let conn = valkey.connection_for(key, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        Ok(Following { valkey, key: key.to_owned(), timeout, conn })
    }

    pub fn valkey(&self) -> &Valkey {
        &self.valkey
    }

    fn follow<T>(&mut self, send: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> redis::RedisResult<T> {
        let deadline = std::time::Instant::now() + FOLLOW_FOR;
        loop {
            match send(&mut self.conn) {
                Err(e) if e.is_cluster_error() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                    self.conn =
                        self.valkey.connection_for(&self.key, self.timeout).map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
                    self.conn.set_read_timeout(Some(self.timeout))?;
                }
                answer => return answer,
            }
        }
    }
}

impl redis::ConnectionLike for Following {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        self.follow(|c| c.req_packed_command(cmd))
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> redis::RedisResult<Vec<redis::Value>> {
        self.follow(|c| c.req_packed_commands(cmd, offset, count))
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.conn.check_connection()
    }

    fn is_open(&self) -> bool {
        self.conn.is_open()
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
