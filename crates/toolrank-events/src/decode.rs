//! Per-line detection and decoding of every SPEC §2 format that fits on a line.
//!
//! One serde pass reads the line into [`Envelope`], a struct with the distinguishing
//! top-level fields of all formats; which of them are present decides the format. The
//! AWS SDK and `aws_lambda_events` types are owned (`String`, `HashMap`) and would
//! allocate for every attribute of every item; these borrow from the line instead.

use crate::attr::{Attr, Image, Str};
use crate::change::{Action, AgentItem, Change, Entity, Execution, HistKey, KeyError, AGENT_ENTITY, HIST_ENTITY, METADATA_SK};
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
}

impl Format {
    pub const ALL: [Format; 5] = [Format::Export, Format::TypedItem, Format::StreamRecord, Format::LambdaEvent, Format::Flat];

    pub fn name(self) -> &'static str {
        match self {
            Format::Export => "export",
            Format::TypedItem => "typed-item",
            Format::StreamRecord => "stream-record",
            Format::LambdaEvent => "lambda-event",
            Format::Flat => "flat",
        }
    }
}

/// Why a line or record was rejected. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unrecognized record: expected an export line {{\"Item\":...}}, a typed item with PK/SK, a stream record with eventName and dynamodb, a Lambda event {{\"Records\":[...]}} or a flat event with op")]
    Unrecognized,
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{field} must be a string attribute {{\"S\": ...}}, found type {found}")]
    WrongType { field: &'static str, found: String },
    #[error("unknown eventName {0:?}: expected INSERT, MODIFY or REMOVE")]
    UnknownEventName(String),
    #[error("unknown op {0:?}: expected upsert or delete")]
    UnknownOp(String),
    #[error("{0}: {1:?}")]
    Key(KeyError, String),
    #[error("TransactDT {0:?} is not a valid YYYYMMDDHHMMSS timestamp")]
    Timestamp(String),
    #[error("SuccYN {0:?} must be Y or N")]
    Success(String),
    #[error("SequenceNumber {0:?} is not a decimal number")]
    Sequence(String),
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
    let env: Envelope<'a> = serde_json::from_str(text)?;
    let single = |emit: &mut dyn FnMut(Record<'a>), change| emit(Record { index: None, raw: None, result: Ok(change) });
    if let Some(item) = env.item {
        single(emit, put_item(item)?);
        Ok(Format::Export)
    } else if let Some(records) = env.records {
        for (i, raw) in records.into_iter().enumerate() {
            let result = serde_json::from_str::<StreamRecord>(raw.get())
                .map_err(DecodeError::from)
                .and_then(stream_change);
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
    } else if env.pk.is_some() || env.sk.is_some() {
        single(emit, put_item(Image {
            pk: env.pk,
            sk: env.sk,
            entity_type: env.entity_type,
            transact_dt: env.transact_dt_attr,
            succ_yn: env.succ_yn,
            tool_nm: env.tool_nm,
            agent_nm: env.agent_nm,
            gsi1_pk: env.gsi1_pk,
        })?);
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
}

/// A DynamoDB Streams record as Lambda and the Streams API deliver it.
#[derive(serde::Deserialize)]
struct StreamRecord<'a> {
    #[serde(rename = "eventName", borrow)]
    event_name: Option<Str<'a>>,
    #[serde(borrow)]
    dynamodb: Option<StreamData<'a>>,
    #[serde(rename = "userIdentity", borrow)]
    user_identity: Option<UserIdentity<'a>>,
}

#[derive(serde::Deserialize)]
struct StreamData<'a> {
    #[serde(rename = "Keys", borrow)]
    keys: Option<Image<'a>>,
    #[serde(rename = "NewImage", borrow)]
    new_image: Option<Image<'a>>,
    #[serde(rename = "SequenceNumber", borrow)]
    sequence_number: Option<Str<'a>>,
}

#[derive(serde::Deserialize)]
struct UserIdentity<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(rename = "principalId", borrow)]
    principal_id: Option<Str<'a>>,
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
        KeyError::Pk => DecodeError::Key(e, pk.to_owned()),
        KeyError::Sk => DecodeError::Key(e, sk.to_owned()),
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
    let seq = data
        .sequence_number
        .map(|s| s.0.parse::<u128>().map_err(|_| DecodeError::Sequence(s.0.into_owned())))
        .transpose()?;
    let mut change = match name.as_ref() {
        "INSERT" | "MODIFY" => put_item(data.new_image.ok_or(DecodeError::Missing("dynamodb.NewImage"))?)?,
        "REMOVE" => {
            let keys = data.keys.ok_or(DecodeError::Missing("dynamodb.Keys"))?;
            let ttl = rec.user_identity.is_some_and(|u| {
                u.kind.is_some_and(|k| k.0 == "Service")
                    && u.principal_id.is_some_and(|p| p.0 == "dynamodb.amazonaws.com")
            });
            Change {
                pk: required(keys.pk, "dynamodb.Keys.PK")?,
                sk: required(keys.sk, "dynamodb.Keys.SK")?,
                seq: None,
                action: Action::Delete { ttl },
            }
        }
        other => return Err(DecodeError::UnknownEventName(other.to_owned())),
    };
    change.seq = seq;
    Ok(change)
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
        action: Action::Put(Entity::Agent(AgentItem {
            domain_id: domain.0,
            name: f.agent_name.map(|n| n.0),
            partial: true,
        })),
    });
    let hist = Change {
        pk: pk.into(),
        sk: sk.into(),
        seq: None,
        action: Action::Put(Entity::Execution(Execution { tool_nm, at, success })),
    };
    Ok((agent, hist))
}
