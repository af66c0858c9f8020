//! Per-line detection and decoding of every SPEC §2 format that fits on a line.
//!
//! One serde pass reads the line into [`Envelope`], a struct with the distinguishing
//! top-level fields of all formats; which of them are present decides the format. The
//! AWS SDK and `aws_lambda_events` types are owned (`String`, `HashMap`) and would
//! allocate for every attribute of every item; these borrow from the line instead.

use crate::attr::{Attr, Image, Str};
use crate::change::{Action, AgentItem, Change, Entity, Execution, HistKey, KeyError, AGENT_ENTITY, HIST_ENTITY, METADATA_SK};
use crate::fast::Fast;
use crate::redact::{without_values, KeyDigest};
use crate::time::Timestamp;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The wire format of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// A DynamoDB export to S3 line, `{"Item": {...}}`.
    Export,
    /// A bare typed item, `{"PK": {"S": ...}, ...}`.
    TypedItem,
    /// One DynamoDB Streams record (`eventName`, `dynamodb`).
    StreamRecord,
    /// A whole Lambda event, `{"Records": [...]}`.
    LambdaEvent,
    /// A staging-shaped flat event (`op`, `user_id`, ...).
    Flat,
    /// A DynamoDB incremental export line: `Metadata.WriteTimestampMicros`, `Keys`,
    /// `NewImage` (absent for a delete), `OldImage`.
    IncrementalExport,
}

impl Format {
    pub const ALL: [Format; 6] = [Format::Export, Format::TypedItem, Format::StreamRecord, Format::LambdaEvent, Format::Flat, Format::IncrementalExport];

    pub fn name(self) -> &'static str {
        match self {
            Format::Export => "export",
            Format::TypedItem => "typed-item",
            Format::StreamRecord => "stream-record",
            Format::LambdaEvent => "lambda-event",
            Format::Flat => "flat",
            Format::IncrementalExport => "incremental-export",
        }
    }
}

/// Why a line or record was rejected. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not UTF-8 text")]
    NotUtf8,
    /// The parser's message without the values it quotes ([`without_values`]).
    #[error("not valid JSON: {}", without_values(&.0.to_string()))]
    Json(#[from] serde_json::Error),
    #[error("unrecognized record: expected an export line {{\"Item\":...}}, an incremental export line {{\"Metadata\":...,\"Keys\":...}}, a typed item with PK/SK, a stream record with eventName and dynamodb, a Lambda event {{\"Records\":[...]}} or a flat event with op")]
    Unrecognized,
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{field} must be a string attribute {{\"S\": ...}}, found type {found}")]
    WrongType { field: &'static str, found: String },
    #[error("unknown eventName {0:?}: expected INSERT, MODIFY or REMOVE")]
    UnknownEventName(String),
    #[error("unknown op {0:?}: expected upsert or delete")]
    UnknownOp(String),
    /// The key by its digest: keys hold user ids.
    #[error("{0}: {1}")]
    Key(KeyError, KeyDigest),
    #[error("TransactDT {0:?} is not a valid YYYYMMDDHHMMSS timestamp")]
    Timestamp(String),
    #[error("SuccYN {0:?} must be Y or N")]
    Success(String),
    #[error("SequenceNumber {0:?} is not a decimal number")]
    Sequence(String),
    #[error("Metadata.WriteTimestampMicros {0:?} is not a decimal number")]
    WriteTimestamp(String),
    #[error("Agent item with SK {0:?}: agents live at SK = METADATA")]
    AgentSk(String),
}

/// One decoded record of a line; Lambda events carry several.
pub struct Record<'a> {
    /// Index within a Lambda event's `Records`, `None` for single-record lines.
    pub index: Option<usize>,
    /// The raw record, for dead letters of one record inside a batch.
    pub raw: Option<&'a str>,
    pub result: Result<Change<'a>, DecodeError>,
}

/// Decodes one line. Changes (and per-record errors inside a Lambda event) go to `emit`
/// in order; an error that rejects the whole line is returned instead, and then nothing
/// was emitted.
pub fn decode_line<'a>(line: &'a [u8], emit: &mut dyn FnMut(Record<'a>)) -> Result<Format, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    match crate::fast::line(text) {
        Some(Fast::Export(item)) => {
            single(emit, put_item(item)?);
            Ok(Format::Export)
        }
        Some(Fast::Stream(rec)) => {
            single(emit, stream_change(rec)?);
            Ok(Format::StreamRecord)
        }
        None => decode_envelope(text, emit),
    }
}

/// Emits the one change of a single-record line.
fn single<'a>(emit: &mut dyn FnMut(Record<'a>), change: Change<'a>) {
    emit(Record { index: None, raw: None, result: Ok(change) });
}

/// [`decode_line`] by serde: every format, and every error with its position.
fn decode_envelope<'a>(text: &'a str, emit: &mut dyn FnMut(Record<'a>)) -> Result<Format, DecodeError> {
    let env: Envelope<'a> = serde_json::from_str(text)?;
    if let Some(item) = env.item {
        single(emit, put_item(item)?);
        Ok(Format::Export)
    } else if let Some(records) = env.records {
        for (i, raw) in records.into_iter().enumerate() {
            let result = serde_json::from_str::<StreamRecord>(raw.get()).map_err(DecodeError::from).and_then(stream_change);
            emit(Record { index: Some(i), raw: Some(raw.get()), result });
        }
        Ok(Format::LambdaEvent)
    } else if env.event_name.is_some() || env.dynamodb.is_some() {
        let rec = StreamRecord { event_name: env.event_name, dynamodb: env.dynamodb, user_identity: env.user_identity };
        single(emit, stream_change(rec)?);
        Ok(Format::StreamRecord)
    } else if env.op.is_some() || env.user_id.is_some() || env.event_id.is_some() {
        let (agent, hist) = flat_changes(Flat {
            op: env.op,
            user_id: env.user_id,
            session_id: env.session_id,
            process_id: env.process_id,
            domain_id: env.domain_id,
            agent_id: env.agent_id,
            agent_name: env.agent_name,
            tool_id: env.tool_id,
            tool_name: env.tool_name,
            success: env.success,
            transact_dt: env.transact_dt,
        })?;
        if let Some(agent) = agent {
            single(emit, agent);
        }
        single(emit, hist);
        Ok(Format::Flat)
    } else if env.metadata.is_some() || env.keys.is_some() {
        single(emit, incremental_change(env.metadata, env.keys, env.new_image)?);
        Ok(Format::IncrementalExport)
    } else if env.pk.is_some() || env.sk.is_some() {
        single(
            emit,
            put_item(Image {
                pk: env.pk,
                sk: env.sk,
                entity_type: env.entity_type,
                transact_dt: env.transact_dt_attr,
                succ_yn: env.succ_yn,
                tool_nm: env.tool_nm,
                agent_nm: env.agent_nm,
                gsi1_pk: env.gsi1_pk,
            })?,
        );
        Ok(Format::TypedItem)
    } else {
        Err(DecodeError::Unrecognized)
    }
}

/// The union of every format's distinguishing fields, spelled out rather than
/// `#[serde(flatten)]`ed: flatten buffers the whole object and would halve throughput.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "Item", borrow)]
    item: Option<Image<'a>>,
    #[serde(rename = "Records", borrow)]
    records: Option<Vec<&'a RawValue>>,
    #[serde(rename = "eventName", borrow)]
    event_name: Option<Str<'a>>,
    #[serde(borrow)]
    dynamodb: Option<StreamData<'a>>,
    #[serde(rename = "userIdentity", borrow)]
    user_identity: Option<UserIdentity<'a>>,
    event_id: Option<serde::de::IgnoredAny>,
    #[serde(borrow)]
    op: Option<Str<'a>>,
    #[serde(borrow)]
    user_id: Option<Str<'a>>,
    #[serde(borrow)]
    session_id: Option<Str<'a>>,
    #[serde(borrow)]
    process_id: Option<Str<'a>>,
    #[serde(borrow)]
    domain_id: Option<Str<'a>>,
    #[serde(borrow)]
    agent_id: Option<Str<'a>>,
    #[serde(borrow)]
    agent_name: Option<Str<'a>>,
    #[serde(borrow)]
    tool_id: Option<Str<'a>>,
    #[serde(borrow)]
    tool_name: Option<Str<'a>>,
    success: Option<FlatBool>,
    #[serde(borrow)]
    transact_dt: Option<Str<'a>>,
    #[serde(rename = "PK", borrow)]
    pk: Option<Attr<'a>>,
    #[serde(rename = "SK", borrow)]
    sk: Option<Attr<'a>>,
    #[serde(rename = "EntityType", borrow)]
    entity_type: Option<Attr<'a>>,
    #[serde(rename = "TransactDT", borrow)]
    transact_dt_attr: Option<Attr<'a>>,
    #[serde(rename = "SuccYN", borrow)]
    succ_yn: Option<Attr<'a>>,
    #[serde(rename = "ToolNM", borrow)]
    tool_nm: Option<Attr<'a>>,
    #[serde(rename = "AgentNM", borrow)]
    agent_nm: Option<Attr<'a>>,
    #[serde(rename = "GSI1_PK", borrow)]
    gsi1_pk: Option<Attr<'a>>,
    #[serde(rename = "Metadata", borrow)]
    metadata: Option<ExportMetadata<'a>>,
    #[serde(rename = "Keys", borrow)]
    keys: Option<Image<'a>>,
    #[serde(rename = "NewImage", borrow)]
    new_image: Option<Image<'a>>,
}

/// An incremental export line's `Metadata`.
#[derive(serde::Deserialize)]
struct ExportMetadata<'a> {
    #[serde(rename = "WriteTimestampMicros", borrow)]
    write_timestamp_micros: Option<Number<'a>>,
}

/// A number attribute, `{"N": "..."}`.
#[derive(serde::Deserialize)]
struct Number<'a> {
    #[serde(rename = "N", borrow)]
    n: Str<'a>,
}

/// A DynamoDB Streams record as Lambda and the Streams API deliver it.
#[derive(serde::Deserialize)]
pub(crate) struct StreamRecord<'a> {
    #[serde(rename = "eventName", borrow)]
    pub(crate) event_name: Option<Str<'a>>,
    #[serde(borrow)]
    pub(crate) dynamodb: Option<StreamData<'a>>,
    #[serde(rename = "userIdentity", borrow)]
    pub(crate) user_identity: Option<UserIdentity<'a>>,
}

#[derive(serde::Deserialize)]
pub(crate) struct StreamData<'a> {
    #[serde(rename = "Keys", borrow)]
    pub(crate) keys: Option<Image<'a>>,
    #[serde(rename = "NewImage", borrow)]
    pub(crate) new_image: Option<Image<'a>>,
    #[serde(rename = "SequenceNumber", borrow)]
    pub(crate) sequence_number: Option<Str<'a>>,
    /// Kept raw: seconds in Lambda events, milliseconds or microseconds from Kinesis.
    #[serde(rename = "ApproximateCreationDateTime", borrow)]
    pub(crate) approximate_creation: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
pub(crate) struct UserIdentity<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) kind: Option<Str<'a>>,
    #[serde(rename = "principalId", borrow)]
    pub(crate) principal_id: Option<Str<'a>>,
}

/// SPEC §2's staging-shaped flat event (its fields, taken from the [`Envelope`]).
struct Flat<'a> {
    op: Option<Str<'a>>,
    user_id: Option<Str<'a>>,
    session_id: Option<Str<'a>>,
    process_id: Option<Str<'a>>,
    domain_id: Option<Str<'a>>,
    agent_id: Option<Str<'a>>,
    agent_name: Option<Str<'a>>,
    tool_id: Option<Str<'a>>,
    tool_name: Option<Str<'a>>,
    success: Option<FlatBool>,
    transact_dt: Option<Str<'a>>,
}

/// `success` of a flat event: `true`/`false`, or the seed's `"Y"`/`"N"`.
struct FlatBool(bool);

impl<'de> serde::Deserialize<'de> for FlatBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FlatBool;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, \"Y\" or \"N\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FlatBool, E> {
                Ok(FlatBool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FlatBool, E> {
                match v {
                    "Y" | "true" => Ok(FlatBool(true)),
                    "N" | "false" => Ok(FlatBool(false)),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn string_attr<'a>(attr: Option<Attr<'a>>, field: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    match attr {
        None => Ok(None),
        Some(Attr::S(s)) => Ok(Some(s)),
        Some(Attr::Other(found)) => Err(DecodeError::WrongType { field, found }),
    }
}

fn required<'a>(attr: Option<Attr<'a>>, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
    string_attr(attr, field)?.ok_or(DecodeError::Missing(field))
}

fn hist_key_check(pk: &str, sk: &str) -> Result<(), DecodeError> {
    HistKey::parse(pk, sk).map(|_| ()).map_err(|e| match e {
        KeyError::Pk => DecodeError::Key(e, KeyDigest::of(pk)),
        KeyError::Sk => DecodeError::Key(e, KeyDigest::of(sk)),
    })
}

/// Validates a whole item into the content of a `Put`.
fn put_item(img: Image<'_>) -> Result<Change<'_>, DecodeError> {
    let pk = required(img.pk, "PK")?;
    let sk = required(img.sk, "SK")?;
    let entity_type = required(img.entity_type, "EntityType")?;
    let entity = match entity_type.as_ref() {
        HIST_ENTITY => {
            hist_key_check(&pk, &sk)?;
            let tool_nm = required(img.tool_nm, "ToolNM")?;
            let dt = required(img.transact_dt, "TransactDT")?;
            let at = Timestamp::parse(&dt).ok_or_else(|| DecodeError::Timestamp(dt.into_owned()))?;
            let success = match required(img.succ_yn, "SuccYN")?.as_ref() {
                "Y" => true,
                "N" => false,
                other => return Err(DecodeError::Success(other.to_owned())),
            };
            Entity::Execution(Execution { tool_nm, at, success })
        }
        AGENT_ENTITY => {
            if sk != METADATA_SK {
                return Err(DecodeError::AgentSk(sk.into_owned()));
            }
            let domain_id = required(img.gsi1_pk, "GSI1_PK (the agent's domain)")?;
            let name = string_attr(img.agent_nm, "AgentNM")?;
            Entity::Agent(AgentItem { domain_id, name, partial: false })
        }
        _ => Entity::Other,
    };
    Ok(Change { pk, sk, seq: None, action: Action::Put(entity) })
}

fn stream_change(rec: StreamRecord<'_>) -> Result<Change<'_>, DecodeError> {
    let name = rec.event_name.ok_or(DecodeError::Missing("eventName"))?.0;
    let data = rec.dynamodb.ok_or(DecodeError::Missing("dynamodb"))?;
    let ttl = rec.user_identity.is_some_and(|u| u.kind.is_some_and(|k| k.0 == "Service") && u.principal_id.is_some_and(|p| p.0 == "dynamodb.amazonaws.com"));
    stream_record_change(&name, data.keys, data.new_image, data.sequence_number.map(|s| s.0).as_deref(), ttl)
}

/// The change a DynamoDB stream record describes, from its parts: for consumers that get
/// records already parsed (the Streams API's SDK types). `ttl`: the record's
/// `userIdentity` is the DynamoDB service (a TTL removal).
pub fn stream_record_change<'a>(
    event_name: &str,
    keys: Option<Image<'a>>,
    new_image: Option<Image<'a>>,
    sequence_number: Option<&str>,
    ttl: bool,
) -> Result<Change<'a>, DecodeError> {
    let seq = sequence_number.map(|s| s.parse::<u128>().map_err(|_| DecodeError::Sequence(s.to_owned()))).transpose()?;
    let mut change = match event_name {
        "INSERT" | "MODIFY" => put_item(new_image.ok_or(DecodeError::Missing("dynamodb.NewImage"))?)?,
        "REMOVE" => {
            let keys = keys.ok_or(DecodeError::Missing("dynamodb.Keys"))?;
            Change { pk: required(keys.pk, "dynamodb.Keys.PK")?, sk: required(keys.sk, "dynamodb.Keys.SK")?, seq: None, action: Action::Delete { ttl } }
        }
        other => return Err(DecodeError::UnknownEventName(other.to_owned())),
    };
    change.seq = seq;
    Ok(change)
}

/// An incremental export line's change: the new image, or a delete of its keys. Its write
/// time orders it, so it outranks the full export it follows (whose items have no order)
/// and an older incremental export's line for the same item.
fn incremental_change<'a>(metadata: Option<ExportMetadata<'a>>, keys: Option<Image<'a>>, new_image: Option<Image<'a>>) -> Result<Change<'a>, DecodeError> {
    let micros = metadata.and_then(|m| m.write_timestamp_micros).ok_or(DecodeError::Missing("Metadata.WriteTimestampMicros"))?.n.0;
    let seq = micros.parse::<u128>().map_err(|_| DecodeError::WriteTimestamp(micros.into_owned()))?;
    let mut change = match new_image {
        Some(image) => put_item(image)?,
        None => {
            let keys = keys.ok_or(DecodeError::Missing("Keys"))?;
            Change { pk: required(keys.pk, "Keys.PK")?, sk: required(keys.sk, "Keys.SK")?, seq: None, action: Action::Delete { ttl: false } }
        }
    };
    change.seq = Some(seq);
    Ok(change)
}

/// Decodes the data of a Kinesis record carrying a DynamoDB change (Kinesis Data Streams
/// for DynamoDB). Those records have no stream `SequenceNumber` and may arrive twice or
/// out of order for one item, so `ApproximateCreationDateTime` orders them (in
/// microseconds: enable MICROSECOND precision on the table's Kinesis destination, or two
/// changes of one item within a millisecond are indistinguishable). Also returns that
/// time in milliseconds.
pub fn decode_kinesis_data(data: &[u8]) -> Result<(Change<'_>, Option<i64>), DecodeError> {
    let text = std::str::from_utf8(data).map_err(|_| DecodeError::NotUtf8)?;
    let rec: StreamRecord<'_> = serde_json::from_str(text)?;
    let micros = rec.dynamodb.as_ref().and_then(|d| d.approximate_creation).and_then(|raw| creation_micros(raw.get()));
    let mut change = stream_change(rec)?;
    if change.seq.is_none() {
        change.seq = micros.map(|m| m as u128);
    }
    Ok((change, micros.map(|m| (m / 1000) as i64)))
}

/// `ApproximateCreationDateTime` in microseconds, whatever unit it was written in.
fn creation_micros(raw: &str) -> Option<u64> {
    let v: f64 = raw.parse().ok()?;
    if !(v.is_finite() && v > 0.0) {
        return None;
    }
    let micros = if v < 1e11 {
        v * 1e6
    } else if v < 1e14 {
        v * 1e3
    } else {
        v
    };
    Some(micros as u64)
}

/// A flat event becomes the hist item change, preceded by an agent catalog upsert when it
/// names a domain.
fn flat_changes(f: Flat<'_>) -> Result<(Option<Change<'_>>, Change<'_>), DecodeError> {
    fn req<'a>(v: Option<Str<'a>>, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
        v.map(|s| s.0).ok_or(DecodeError::Missing(field))
    }
    let op = f.op.map(|s| s.0).unwrap_or(Cow::Borrowed("upsert"));
    let upsert = match op.as_ref() {
        "upsert" => true,
        "delete" => false,
        other => return Err(DecodeError::UnknownOp(other.to_owned())),
    };
    let user = req(f.user_id, "user_id")?;
    let session = req(f.session_id, "session_id")?;
    let process = req(f.process_id, "process_id")?;
    let agent_id = req(f.agent_id, "agent_id")?;
    let tool = req(f.tool_id, "tool_id")?;
    let pk = format!("{user}#{session}");
    let sk = format!("{process}#{agent_id}#{tool}");
    hist_key_check(&pk, &sk)?;
    if !upsert {
        let hist = Change { pk: pk.into(), sk: sk.into(), seq: None, action: Action::Delete { ttl: false } };
        return Ok((None, hist));
    }
    let tool_nm = req(f.tool_name, "tool_name")?;
    let dt = req(f.transact_dt, "transact_dt")?;
    let at = Timestamp::parse(&dt).ok_or_else(|| DecodeError::Timestamp(dt.into_owned()))?;
    let success = f.success.ok_or(DecodeError::Missing("success"))?.0;
    let agent = f.domain_id.map(|domain| Change {
        pk: agent_id.clone(),
        sk: Cow::Borrowed(METADATA_SK),
        seq: None,
        action: Action::Put(Entity::Agent(AgentItem { domain_id: domain.0, name: f.agent_name.map(|n| n.0), partial: true })),
    });
    let hist = Change { pk: pk.into(), sk: sk.into(), seq: None, action: Action::Put(Entity::Execution(Execution { tool_nm, at, success })) };
    Ok((agent, hist))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINESIS: &str = r#"{"awsRegion":"us-east-1","eventID":"e1","eventName":"MODIFY","userIdentity":null,"recordFormat":"application/json","tableName":"AgentTable","dynamodb":{"ApproximateCreationDateTime":1752480000123456,"Keys":{"PK":{"S":"U1#S1"},"SK":{"S":"P1#A1#T1"}},"NewImage":{"PK":{"S":"U1#S1"},"SK":{"S":"P1#A1#T1"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"search"},"TransactDT":{"S":"20250714080000"},"SuccYN":{"S":"Y"}},"SizeBytes":120},"eventSource":"aws:dynamodb"}"#;

    #[test]
    fn kinesis_records_are_ordered_by_creation_time() {
        let (change, ms) = decode_kinesis_data(KINESIS.as_bytes()).unwrap();
        assert_eq!(change.seq, Some(1_752_480_000_123_456));
        assert_eq!(ms, Some(1_752_480_000_123));
        let millis = KINESIS.replace("1752480000123456", "1752480000123");
        assert_eq!(decode_kinesis_data(millis.as_bytes()).unwrap().0.seq, Some(1_752_480_000_123_000));
        // A stream sequence number, when present, wins.
        let with_seq = KINESIS.replace(r#""SizeBytes":120"#, r#""SizeBytes":120,"SequenceNumber":"42""#);
        assert_eq!(decode_kinesis_data(with_seq.as_bytes()).unwrap().0.seq, Some(42));
        assert!(decode_kinesis_data(b"{\"eventName\":\"MODIFY\"}").is_err());
    }

    #[test]
    fn ttl_removals_are_marked_from_parts_and_lines() {
        let line = r#"{"eventName":"REMOVE","userIdentity":{"type":"Service","principalId":"dynamodb.amazonaws.com"},"dynamodb":{"Keys":{"PK":{"S":"U1#S1"},"SK":{"S":"P1#A1#T1"}},"SequenceNumber":"7"}}"#;
        let mut got = Vec::new();
        decode_line(line.as_bytes(), &mut |r| got.push(r.result.unwrap().action)).unwrap();
        assert_eq!(got, vec![Action::Delete { ttl: true }]);
        let keys = Image { pk: Some(Attr::S("U1#S1".into())), sk: Some(Attr::S("P1#A1#T1".into())), ..Image::default() };
        let change = stream_record_change("REMOVE", Some(keys), None, Some("8"), false).unwrap();
        assert_eq!((change.seq, change.action), (Some(8), Action::Delete { ttl: false }));
        assert!(matches!(stream_record_change("UPSERT", None, None, None, false), Err(DecodeError::UnknownEventName(_))));
    }

    fn decode_one(line: &str) -> (Format, Result<Change<'_>, DecodeError>) {
        let mut got = None;
        match decode_line(line.as_bytes(), &mut |r| got = Some(r.result)) {
            Ok(format) => (format, got.expect("one record")),
            Err(e) => (Format::Flat, Err(e)),
        }
    }

    #[test]
    fn incremental_export_lines_are_changes_at_their_write_time() {
        let keys = r#""Keys":{"PK":{"S":"U1#S1"},"SK":{"S":"P1#A1#T1"}}"#;
        let image = r#"{"PK":{"S":"U1#S1"},"SK":{"S":"P1#A1#T1"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"search"},"TransactDT":{"S":"20250714080000"},"SuccYN":{"S":"N"}}"#;
        let put = format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1752480000123456"}}}},{keys},"NewImage":{image},"OldImage":{image}}}"#);
        let (format, change) = decode_one(&put);
        let change = change.unwrap();
        assert_eq!((format, change.seq), (Format::IncrementalExport, Some(1_752_480_000_123_456)));
        assert!(matches!(change.action, Action::Put(Entity::Execution(ref e)) if !e.success && e.tool_nm == "search"));
        let delete = format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1752480000123457"}}}},{keys},"OldImage":{image}}}"#);
        let change = decode_one(&delete).1.unwrap();
        assert_eq!(
            (change.pk.as_ref(), change.sk.as_ref(), change.seq, change.action),
            ("U1#S1", "P1#A1#T1", Some(1_752_480_000_123_457), Action::Delete { ttl: false })
        );
        assert!(matches!(decode_one(&format!(r#"{{{keys}}}"#)).1, Err(DecodeError::Missing("Metadata.WriteTimestampMicros"))));
        assert!(matches!(decode_one(&format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"soon"}}}},{keys}}}"#)).1, Err(DecodeError::WriteTimestamp(_))));
        assert!(matches!(decode_one(r#"{"Metadata":{"WriteTimestampMicros":{"N":"1"}}}"#).1, Err(DecodeError::Missing("Keys"))));
    }

    #[test]
    fn attributes_of_every_dynamodb_type_that_are_not_read_are_ignored() {
        let others = r#""Bin":{"B":"dGVzdA=="},"Bins":{"BS":["dGVzdA==","YQ=="]},"List":{"L":[{"S":"a"},{"N":"1"},{"NULL":true},{"M":{}}]},"Map":{"M":{"ToolValues":{"M":{"q":{"S":"x"}}},"Empty":{"L":[]}}},"Nums":{"NS":["1","2.5"]},"Nothing":{"NULL":true},"Strs":{"SS":["a","b"]},"Flag":{"BOOL":false},"EmptyStrs":{"SS":[]},"EmptyNums":{"NS":[]},"EmptyBins":{"BS":[]},"Num":{"N":"-1e3"}"#;
        let item = format!(
            r#"{{"PK":{{"S":"U1#S1"}},"SK":{{"S":"P1#A1#T1"}},"EntityType":{{"S":"UserSessPrcToolMappHist"}},"ToolNM":{{"S":"search"}},"TransactDT":{{"S":"20250714080000"}},"SuccYN":{{"S":"Y"}},{others}}}"#
        );
        for line in [
            format!(r#"{{"Item":{item}}}"#),
            item.clone(),
            format!(r#"{{"eventName":"INSERT","dynamodb":{{"NewImage":{item},"SequenceNumber":"5"}}}}"#),
            format!(r#"{{"Records":[{{"eventName":"MODIFY","dynamodb":{{"NewImage":{item},"SequenceNumber":"6"}}}}]}}"#),
        ] {
            let change = decode_one(&line).1.unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(matches!(change.action, Action::Put(Entity::Execution(ref e)) if e.success && e.tool_nm == "search"), "{line}");
        }
        // A read attribute of another type is still an error that names it.
        let wrong = item.replace(r#""ToolNM":{"S":"search"}"#, r#""ToolNM":{"SS":["search"]}"#);
        assert!(matches!(decode_one(&wrong).1, Err(DecodeError::WrongType { field: "ToolNM", .. })));
    }

    /// A line's outcome, compared as text: its format or error, and each record's change
    /// or error (`fast`: through [`decode_line`], else the serde path alone).
    fn outcome(line: &[u8], fast: bool) -> String {
        let mut records = Vec::new();
        let mut emit = |r: Record<'_>| records.push(format!("{:?} {:?} {:?}", r.index, r.raw, r.result.map_err(|e| e.to_string())));
        let result = match (fast, std::str::from_utf8(line)) {
            (true, _) => decode_line(line, &mut emit),
            (false, Ok(text)) => decode_envelope(text, &mut emit),
            (false, Err(_)) => Err(DecodeError::NotUtf8),
        };
        format!("{:?} {records:?}", result.map_err(|e| e.to_string()))
    }

    const EXECUTION: &[(&str, &str)] = &[
        ("PK", r#"{"S":"USR001#SESS1"}"#),
        ("SK", r#"{"S":"PRC001#AGT001#TL001"}"#),
        ("EntityType", r#"{"S":"UserSessPrcToolMappHist"}"#),
        ("ToolNM", r#"{"S":"FIND"}"#),
        ("ToolValues", r#"{"M":{"q":{"S":"x"},"n":{"N":"3"},"l":{"L":[{"BOOL":true},{"NULL":true}]}}}"#),
        ("TransactDT", r#"{"S":"20250614140605"}"#),
        ("SuccYN", r#"{"S":"Y"}"#),
    ];
    const AGENT: &[(&str, &str)] = &[
        ("PK", r#"{"S":"AGT001"}"#),
        ("SK", r#"{"S":"METADATA"}"#),
        ("EntityType", r#"{"S":"Agent"}"#),
        ("AgentNM", r#"{"S":"finder"}"#),
        ("GSI1_PK", r#"{"S":"DMN001"}"#),
    ];
    /// Field names: read, unread, spelled with an escape.
    const KEYS: &[&str] = &["PK", "SK", "EntityType", "TransactDT", "SuccYN", "ToolNM", "AgentNM", "GSI1_PK", "ResultMsg", r"P\u004B", "S"];
    /// Values, valid or not for the field they land in.
    const VALUES: &[&str] = &[
        r#"{"S":"USR002#SESS9"}"#,
        r#"{"S":"PRC002#AGT002#TL002"}"#,
        r#"{"S":"METADATA"}"#,
        r#"{"S":"Agent"}"#,
        r#"{"S":"20250101000000"}"#,
        r#"{"S":"2025"}"#,
        r#"{"S":"N"}"#,
        r#"{"S":"X"}"#,
        r#"{"S":"a\"b"}"#,
        r#"{"S":"\u0041GT001"}"#,
        r#"{"S":"한글"}"#,
        "{ \"S\" :\t\"spaced\" }",
        r#"{"N":"1"}"#,
        r#"{"N":1}"#,
        r#"{"M":{}}"#,
        r#"{"L":[[],[1,-0.5,true,false,"s",{"a":[]}]]}"#,
        r#"{"NULL":true}"#,
        r#"{"S":"a","N":"1"}"#,
        r#"{"S":1}"#,
        r#"{"S":null}"#,
        "{}",
        "null",
        "1",
        "-0",
        "01",
        "1e5",
        "1.",
        "123456789012345678",
        "12345678901234.5",
        "-",
        "[1,2]",
        "\"s\"",
        "true",
        "tru",
        "nul",
    ];
    const SPACES: &[&str] = &["", "", "", " ", "\n\t", "\r "];

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }

        fn pick<'a>(&mut self, pool: &[&'a str]) -> &'a str {
            pool[self.below(pool.len())]
        }

        fn object(&mut self, fields: &[(String, String)]) -> String {
            let parts: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}\"{k}\"{}:{}{v}{}", self.pick(SPACES), self.pick(SPACES), self.pick(SPACES), self.pick(SPACES)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }

        /// An item image: an execution's, an Agent's or none, with up to three edits.
        fn image(&mut self) -> String {
            let base = [EXECUTION, AGENT, &[]][self.below(3)];
            let mut fields: Vec<(String, String)> = base.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect();
            for _ in 0..self.below(4) {
                let at = self.below(fields.len() + 1);
                let one = at.min(fields.len().saturating_sub(1));
                match self.below(4) {
                    0 if !fields.is_empty() => fields[one].1 = self.pick(VALUES).to_owned(),
                    1 if !fields.is_empty() => fields.insert(at, fields[one].clone()),
                    2 if !fields.is_empty() => {
                        fields.remove(one);
                    }
                    _ => fields.insert(at, (self.pick(KEYS).to_owned(), self.pick(VALUES).to_owned())),
                }
            }
            self.object(&fields)
        }

        fn stream_record(&mut self) -> String {
            let mut data = vec![
                ("Keys".to_owned(), self.image()),
                ("SequenceNumber".to_owned(), self.pick(&["\"12\"", "\"4000000000000000003\"", "\"x\"", "12", "null"]).to_owned()),
            ];
            if self.below(4) > 0 {
                data.push(("NewImage".to_owned(), self.image()));
            }
            for _ in 0..self.below(3) {
                let extra = self.pick(&["ApproximateCreationDateTime", "StreamViewType", "OldImage", "SizeBytes", "Keys", "NewImage"]);
                let value = if extra.ends_with("Image") || extra == "Keys" { self.image() } else { self.pick(VALUES).to_owned() };
                data.insert(self.below(data.len() + 1), (extra.to_owned(), value));
            }
            let name = self.pick(&["\"INSERT\"", "\"MODIFY\"", "\"REMOVE\"", "\"DROP\"", "null", "1", r#""INS\u0045RT""#]);
            let user = self.pick(&[
                r#"{"type":"Service","principalId":"dynamodb.amazonaws.com"}"#,
                r#"{"type":"User"}"#,
                "null",
                r#"{"type":"Service","type":"Service"}"#,
            ]);
            let mut fields =
                vec![("eventID".to_owned(), "\"e1\"".to_owned()), ("eventName".to_owned(), name.to_owned()), ("dynamodb".to_owned(), self.object(&data))];
            if self.below(3) == 0 {
                fields.push(("userIdentity".to_owned(), user.to_owned()));
            }
            self.top_level_extras(&mut fields);
            self.object(&fields)
        }

        /// Sometimes a field of another format, or one no format has.
        fn top_level_extras(&mut self, fields: &mut Vec<(String, String)>) {
            if self.below(4) == 0 {
                let extra = self.pick(&["awsRegion", "eventSource", "op", "Records", "Keys", "PK", "Metadata", "event_id", "unknown", "eventName", "Item"]);
                let value = if matches!(extra, "Keys" | "Item") { self.image() } else { self.pick(VALUES).to_owned() };
                fields.insert(self.below(fields.len() + 1), (extra.to_owned(), value));
            }
        }

        fn line(&mut self) -> Vec<u8> {
            let mut line = match self.below(6) {
                0..=1 => {
                    let mut fields = vec![("Item".to_owned(), self.image())];
                    self.top_level_extras(&mut fields);
                    self.object(&fields)
                }
                2..=4 => self.stream_record(),
                _ => format!("{{\"Records\":[{}]}}", self.stream_record()),
            }
            .into_bytes();
            // Sometimes a byte changed, added, removed, or the line cut short.
            if self.below(3) == 0 && !line.is_empty() {
                let at = self.below(line.len());
                let byte = [b'"', b'\\', b'{', b'}', b',', b':', b' ', b'x', b'0', 0x01, 0xff][self.below(11)];
                match self.below(4) {
                    0 => line[at] = byte,
                    1 => line.insert(at, byte),
                    2 => {
                        line.remove(at);
                    }
                    _ => line.truncate(at),
                }
            }
            line
        }
    }

    #[test]
    fn the_fast_path_decodes_what_serde_decodes_and_leaves_the_rest_to_it() {
        let (mut fast, mut decoded, total) = (0, 0, 40_000u64);
        for seed in 1..=total {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let line = rng.line();
            let outcome = outcome(&line, true);
            if std::str::from_utf8(&line).ok().and_then(crate::fast::line).is_some() {
                fast += 1;
                decoded += u64::from(outcome.contains("Ok(Change"));
            }
            assert_eq!(outcome, self::outcome(&line, false), "{}", String::from_utf8_lossy(&line));
        }
        // Both paths were exercised, and the fast one on lines that decode as well as on
        // lines it scanned whose content the decoder then rejects.
        assert!(fast > total / 20 && fast < total / 2, "{fast} of {total} lines took the fast path");
        assert!(decoded > fast / 5 && decoded < fast, "{decoded} of {fast} lines on the fast path decoded to a change");
    }

    #[test]
    fn the_fast_path_takes_export_lines_and_stream_records_as_written() {
        let export = r#"{"Item":{"PK":{"S":"USR001#SESS1"},"SK":{"S":"PRC001#AGT001#TL001"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"FIND"},"TransactDT":{"S":"20250614140605"},"SuccYN":{"S":"Y"}}}"#;
        assert!(matches!(crate::fast::line(export), Some(Fast::Export(_))));
        assert!(crate::fast::line(KINESIS).is_none(), "userIdentity null: the serde path's");
        let record = KINESIS.replace(r#""userIdentity":null,"#, "");
        assert!(matches!(crate::fast::line(&record), Some(Fast::Stream(_))));
        assert!(crate::fast::line(&export.replace("FIND", r"FI\u004eD")).is_none());
        assert!(crate::fast::line(&export.replace(r#""SuccYN""#, r#""PK":{"S":"x"},"SuccYN""#)).is_none());
    }
}
