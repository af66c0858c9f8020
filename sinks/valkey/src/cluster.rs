//! Valkey in cluster mode (ElastiCache Serverless, self-managed clusters). A namespace's
//! keys share one hash tag (`{tr}:agents:…`), so they live in one slot: a flush stays one
//! `WATCH`/`MULTI`/`EXEC` on the node that owns that slot, with the fence inside it, as on
//! a single server. The owner is asked of the cluster (`CLUSTER SLOTS`) for every new
//! connection; when the slot moves, the node answers `MOVED` or `ASK`, the write fails as
//! in an outage, and the next connection goes to the new owner and resynchronizes.

use redis::{ConnectionAddr, ConnectionInfo};

/// CRC16-CCITT (XMODEM), the cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of `key`: of its hash tag (the first `{…}` with something inside) if it has one.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

/// The key prefix of namespace `name`: itself, or in a cluster its hash tag.
pub fn key_prefix(name: &str, cluster: bool) -> String {
    if cluster {
        format!("{{{name}}}")
    } else {
        name.to_owned()
    }
}

/// The hash tag of namespace `name`: the key whose slot holds the namespace in a cluster.
pub fn tag(name: &str) -> String {
    key_prefix(name, true)
}

/// Whether the server is a cluster node (`INFO cluster`).
pub fn enabled(conn: &mut redis::Connection) -> redis::RedisResult<bool> {
    let info: String = redis::cmd("INFO").arg("cluster").query(conn)?;
    Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// The node (host, port) that serves `slot`, as the cluster says now.
pub fn owner(conn: &mut redis::Connection, slot: u16) -> redis::RedisResult<Option<(String, u16)>> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
    for range in ranges {
        let redis::Value::Array(fields) = range else { continue };
        let (Some(first), Some(last), Some(redis::Value::Array(primary))) = (fields.first(), fields.get(1), fields.get(2)) else { continue };
        let (redis::Value::Int(first), redis::Value::Int(last)) = (first, last) else { continue };
        if (*first..=*last).contains(&i64::from(slot)) {
            if let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) = (primary.first(), primary.get(1)) {
                return Ok(Some((String::from_utf8_lossy(host).into_owned(), *port as u16)));
            }
        }
    }
    Ok(None)
}

/// `info` pointed at another node of the same cluster (same TLS settings and user).
pub fn at(info: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls { insecure, tls_params, .. } => ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() },
        _ => ConnectionAddr::Tcp(host, port),
    };
    info.clone().set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of the cluster specification (valkey.io, "Cluster specification":
    /// keys hash tags), and CRC16's check value.
    #[test]
    fn slots_follow_the_cluster_specification() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384, "an empty tag hashes the whole key");
        assert_eq!(slot("foo{{bar}}zap"), crc16(b"{bar") % 16384);
        assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot(&format!("{}:agents:D1", key_prefix("tr", true))), slot("{tr}:pattern:x"));
        assert_eq!(key_prefix("tr", false), "tr");
    }
}
