//! A fast path for the two shapes nearly every line has: an export line `{"Item":{...}}`
//! and a DynamoDB stream record. A scanner written for them builds the same structs the
//! serde path would, without serde's per-field dispatch, and gives up (`None`) on
//! anything else: a string with an escape, a duplicate field, a number it does not check
//! digit by digit, deep nesting, a `null`, a top-level field it does not know. The serde
//! path then decides the line, with its errors, so the fast path changes no outcome (a
//! property test in `decode` holds the two paths to the same result).

use crate::attr::{Attr, Image, Str};
use crate::decode::{StreamData, StreamRecord, UserIdentity};
use std::borrow::Cow;

/// A line the fast path decoded.
#[allow(clippy::large_enum_variant, reason = "one per line, matched at once: a box would cost an allocation")]
pub(crate) enum Fast<'a> {
    Export(Image<'a>),
    Stream(StreamRecord<'a>),
}

/// Top-level fields of stream records that the decoder does not read. Any other field
/// (one of another format's, or one unknown) sends the line to the serde path.
const STREAM_RECORD_EXTRAS: &[&str] = &["eventID", "eventSource", "eventVersion", "awsRegion", "eventSourceARN", "recordFormat", "tableName"];

/// Values nested deeper than this are left to the serde path.
const MAX_DEPTH: u32 = 16;

pub(crate) fn line(text: &str) -> Option<Fast<'_>> {
    let mut s = Scan { text, at: 0 };
    let (mut item, mut name, mut data, mut user) = (None, None, None, None);
    s.object(|s, key| match key {
        "Item" => set(&mut item, s.image()?),
        "eventName" => set(&mut name, Str(Cow::Borrowed(s.string()?))),
        "dynamodb" => set(&mut data, s.stream_data()?),
        "userIdentity" => set(&mut user, s.user_identity()?),
        k if STREAM_RECORD_EXTRAS.contains(&k) => s.skip(1),
        _ => None,
    })?;
    s.space();
    if s.at != text.len() {
        return None;
    }
    match item {
        // As in the serde path, an `Item` decides the format.
        Some(image) => Some(Fast::Export(image)),
        None if name.is_some() || data.is_some() => Some(Fast::Stream(StreamRecord { event_name: name, dynamodb: data, user_identity: user })),
        None => None,
    }
}

/// Fills a field seen for the first time; a second one is the serde path's to reject.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.is_none().then(|| *slot = Some(value))
}

struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// JSON whitespace.
    fn space(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes().get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.space();
        self.bytes().get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string with no escape and no control character, borrowed from the line.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let rest = &self.bytes()[start..];
        let len = escape_at(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // Both ends are ASCII quotes of a `str`: char boundaries.
        Some(&self.text[start..start + len])
    }

    /// An object, each of whose values `field` reads given its key.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.items(b'{', b'}', |s| {
            let key = s.string()?;
            s.eat(b':')?;
            field(s, key)
        })
    }

    /// The comma-separated items of an object or array from `open` to `close`, each read
    /// by `item`.
    fn items(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(open)?;
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                c if c == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Steps over a value the decoder does not read, checking it is JSON as serde_json
    /// would read it.
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            b'[' => self.items(b'[', b']', |s| s.skip(depth + 1)),
            b't' => self.word(b"true"),
            b'f' => self.word(b"false"),
            b'-' | b'0'..=b'9' => self.number(),
            // `null` too: serde reads it as an absent field of some types, not of others.
            _ => None,
        }
    }

    fn word(&mut self, word: &[u8]) -> Option<()> {
        self.bytes()[self.at..].starts_with(word).then(|| self.at += word.len())
    }

    /// An integer or a decimal fraction of at most 100 digits and no exponent: numbers
    /// serde_json reads without a range error (it reads an integer beyond 64 bits as a
    /// float, which overflows only past 308 digits or with an exponent).
    fn number(&mut self) -> Option<()> {
        if self.bytes()[self.at] == b'-' {
            self.at += 1;
        }
        let start = self.at;
        let whole = self.digits();
        if whole == 0 || (whole > 1 && self.bytes()[start] == b'0') {
            return None;
        }
        let mut all = whole;
        if self.bytes().get(self.at) == Some(&b'.') {
            self.at += 1;
            let fraction = self.digits();
            if fraction == 0 {
                return None;
            }
            all += fraction;
        }
        (all <= 100 && !matches!(self.bytes().get(self.at), Some(b'e' | b'E'))).then_some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.bytes().get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        self.at - start
    }

    /// A typed attribute value: its string if of type `S`, else its type.
    fn attr(&mut self) -> Option<Attr<'a>> {
        self.eat(b'{')?;
        let tag = self.string()?;
        self.eat(b':')?;
        let value = if tag == "S" {
            Attr::S(Cow::Borrowed(self.string()?))
        } else {
            self.skip(1)?;
            Attr::Other(tag.to_owned())
        };
        self.eat(b'}')?;
        Some(value)
    }

    fn image(&mut self) -> Option<Image<'a>> {
        let mut img = Image::default();
        self.object(|s, key| {
            let slot = match key {
                "PK" => &mut img.pk,
                "SK" => &mut img.sk,
                "EntityType" => &mut img.entity_type,
                "TransactDT" => &mut img.transact_dt,
                "SuccYN" => &mut img.succ_yn,
                "ToolNM" => &mut img.tool_nm,
                "AgentNM" => &mut img.agent_nm,
                "GSI1_PK" => &mut img.gsi1_pk,
                _ => return s.skip(1),
            };
            set(slot, s.attr()?)
        })?;
        Some(img)
    }

    fn stream_data(&mut self) -> Option<StreamData<'a>> {
        let (mut keys, mut new_image, mut sequence_number, mut creation) = (None, None, None, None);
        self.object(|s, key| match key {
            "Keys" => set(&mut keys, s.image()?),
            "NewImage" => set(&mut new_image, s.image()?),
            "SequenceNumber" => set(&mut sequence_number, Str(Cow::Borrowed(s.string()?))),
            // Read by Kinesis decoding only, which takes the serde path.
            "ApproximateCreationDateTime" => set(&mut creation, s.skip(1)?),
            _ => s.skip(1),
        })?;
        Some(StreamData { keys, new_image, sequence_number, approximate_creation: None })
    }

    fn user_identity(&mut self) -> Option<UserIdentity<'a>> {
        let (mut kind, mut principal_id) = (None, None);
        self.object(|s, key| match key {
            "type" => set(&mut kind, Str(Cow::Borrowed(s.string()?))),
            "principalId" => set(&mut principal_id, Str(Cow::Borrowed(s.string()?))),
            _ => s.skip(1),
        })?;
        Some(UserIdentity { kind, principal_id })
    }
}
/// The index of the first byte a JSON string must escape (a quote, backslash or control
/// character) in `bytes`, found eight bytes at a time (each test flags a byte's top bit;
/// the lowest flag is always a true one).
pub fn escape_at(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & TOPS;
    let mut chunks = bytes.chunks_exact(8);
    for (i, chunk) in chunks.by_ref().enumerate() {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let flags = below(w ^ (ONES * u64::from(b'"')), 1) | below(w ^ (ONES * u64::from(b'\\')), 1) | below(w, 0x20);
        if flags != 0 {
            return Some(i * 8 + (flags.trailing_zeros() / 8) as usize);
        }
    }
    let tail = chunks.remainder();
    tail.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|p| bytes.len() - tail.len() + p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_to_escape_are_found_eight_at_a_time_as_one_by_one() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..200 {
            for _ in 0..50 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Mostly plain text, sometimes a byte that ends the scan.
                        [b'a', b'Z', b'#', 0x7f, 0xc3, 0x80, b' ', b'"', b'\\', 0x00, 0x1f, 0x20][(x % 12) as usize * usize::from(x.is_multiple_of(7)) % 12]
                    })
                    .collect();
                let slow = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
                assert_eq!(super::escape_at(&bytes), slow, "{bytes:?}");
            }
        }
    }
}
