//! What may be said about a record where it can be read by anyone who reads logs.
//!
//! The seed's items carry user ids in their keys, user profiles, prompts and tool
//! arguments. Reasons for rejecting a record go to logs and metrics as well as to dead
//! letters, so they name a key by a short, stable hash (the same key always gives the
//! same hash, so an operator can match log lines with a dead letter's record) and never
//! quote a value.

use std::fmt;

/// A key as logs show it: `key:` and 12 hex digits of its 64-bit FNV-1a hash (stable
/// across processes and versions, unlike the standard library's hasher).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(u64);

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        KeyDigest(h)
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key:{:012x}", self.0 >> 16)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A JSON parser's message without the values it quotes (`invalid type: string "…"`):
/// what went wrong and where, not what the record said.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => {
                quote = Some(c);
                out.push('…');
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_digest_is_stable_and_tells_keys_apart() {
        assert_eq!(KeyDigest::of("USR001").to_string(), KeyDigest::of("USR001").to_string());
        assert_ne!(KeyDigest::of("USR001"), KeyDigest::of("USR002"));
        assert_eq!(KeyDigest::of("").to_string(), "key:cbf29ce48422");
        assert!(!KeyDigest::of("USR001").to_string().contains("USR"));
    }

    #[test]
    fn quoted_values_are_left_out() {
        assert_eq!(
            without_values(r#"invalid type: string "USR001 Kim", expected u64 at line 1 column 9"#),
            "invalid type: string …, expected u64 at line 1 column 9"
        );
        assert_eq!(without_values("invalid type: integer `1`, expected a string"), "invalid type: integer …, expected a string");
        assert_eq!(without_values("EOF while parsing a value"), "EOF while parsing a value");
    }
}
