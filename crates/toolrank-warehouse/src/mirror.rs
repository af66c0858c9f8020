//! A Zero-ETL stand-in: keeps `"AgentTable"("PK","SK","value")` in the warehouse equal to
//! the table the inputs describe, the way Zero-ETL keeps Redshift current.
//!
//! Every input line is validated by the same decoder as every consumer (a rejected record
//! is reported, never mirrored); the item's full image (all attributes, as DynamoDB's
//! typed JSON, like Zero-ETL's SUPER `value`) is taken from the line. Changes are
//! coalesced per key and applied in batches, each one transaction that also records the
//! source positions it covers, so a restarted mirror resumes where its last batch
//! committed and a redelivered record rewrites the same image (state, not deltas: applying
//! a change twice is harmless).

use crate::sql::{self, literal, SESSION};
use crate::{DataApi, Error};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use toolrank_events::{decode_line, Action, Change, DecodeError, Entity, Format, AGENT_ENTITY, HIST_ENTITY, METADATA_SK};

/// A record the decoder rejected: where it was inside the line and why.
#[derive(Debug)]
pub struct Rejected {
    /// Index inside a Lambda event line.
    pub index: Option<usize>,
    pub raw: Option<String>,
    pub reason: String,
}

/// An item's new state: its image, or `None` when it was removed.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemChange {
    pub pk: String,
    pub sk: String,
    pub seq: Option<u128>,
    pub image: Option<Value>,
    /// A flat agent event without a name keeps the name the item had.
    pub keeps_name: bool,
}

/// Decodes one line into item changes (in order) and rejected records. An error rejects
/// the whole line.
pub fn decode(line: &[u8]) -> Result<Vec<Result<ItemChange, Rejected>>, DecodeError> {
    let mut records = Vec::new();
    let format = decode_line(line, &mut |r| records.push(r))?;
    let doc: Value = if format == Format::Flat { Value::Null } else { serde_json::from_slice(line)? };
    Ok(records
        .into_iter()
        .map(|r| match r.result {
            Err(e) => Err(Rejected { index: r.index, raw: r.raw.map(str::to_owned), reason: e.to_string() }),
            Ok(change) => Ok(item_change(&change, image(format, &doc, r.index, &change))),
        })
        .collect())
}

fn image(format: Format, doc: &Value, index: Option<usize>, change: &Change) -> Option<Value> {
    if matches!(change.action, Action::Delete { .. }) {
        return None;
    }
    Some(match format {
        Format::Export => doc["Item"].clone(),
        Format::TypedItem => doc.clone(),
        Format::StreamRecord => doc["dynamodb"]["NewImage"].clone(),
        Format::LambdaEvent => doc["Records"][index.unwrap_or(0)]["dynamodb"]["NewImage"].clone(),
        Format::Flat => flat_item(change),
        Format::IncrementalExport => doc["NewImage"].clone(),
    })
}

fn item_change(change: &Change, image: Option<Value>) -> ItemChange {
    let keeps_name = matches!(&change.action, Action::Put(Entity::Agent(a)) if a.partial && a.name.is_none());
    ItemChange { pk: change.pk.to_string(), sk: change.sk.to_string(), seq: change.seq, image, keeps_name }
}

/// The item a flat event stands for, as DynamoDB's typed JSON.
fn flat_item(change: &Change) -> Value {
    let s = |v: &str| json!({ "S": v });
    match &change.action {
        Action::Put(Entity::Execution(e)) => {
            let digits: String = e.at.datetime_bytes().iter().filter(|b| b.is_ascii_digit()).map(|&b| b as char).collect();
            json!({
                "PK": s(&change.pk), "SK": s(&change.sk), "EntityType": s(HIST_ENTITY),
                "ToolNM": s(&e.tool_nm), "TransactDT": s(&digits), "SuccYN": s(if e.success { "Y" } else { "N" }),
            })
        }
        Action::Put(Entity::Agent(a)) => {
            let mut item = json!({ "PK": s(&change.pk), "SK": s(METADATA_SK), "EntityType": s(AGENT_ENTITY), "GSI1_PK": s(&a.domain_id) });
            if let Some(name) = &a.name {
                item["AgentNM"] = s(name);
            }
            item
        }
        _ => json!({ "PK": s(&change.pk), "SK": s(&change.sk) }),
    }
}

/// What a mirror has applied.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub items_written: u64,
    pub items_removed: u64,
    pub stale: u64,
    pub batches: u64,
}

/// Coalesces item changes per key and applies them in transactional batches.
pub struct Mirror {
    source: String,
    /// Each key's latest image, serialized once (its size decides when a batch is full).
    pending: BTreeMap<(String, String), Option<String>>,
    pending_bytes: usize,
    positions: BTreeMap<String, String>,
    /// Last applied stream sequence number per key: an older record is stale.
    seqs: HashMap<(String, String), u128>,
    /// Agent names, for flat agent events that omit the name.
    agent_names: HashMap<String, Value>,
    batch_id: String,
    pub stats: Stats,
}

/// Statements per BatchExecuteStatement (the Data API allows 40) and bytes per statement
/// (it allows 100 KB).
const MAX_STATEMENTS: usize = 40;
const MAX_STATEMENT_BYTES: usize = 90_000;
/// Batch statements besides the inserts: session settings, apply, positions.
const FIXED_STATEMENTS: usize = SESSION.len() + 5;

impl Mirror {
    /// Creates the mirror tables where missing and returns a mirror for `source` (a name
    /// for the positions it records: a topic, a stream ARN, "files").
    pub async fn open(api: &DataApi, source: &str) -> Result<Mirror, Error> {
        api.batch(sql::batch(&sql::MIRROR, toolrank_events::Day(0))).await?;
        let batch_id =
            format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        Ok(Mirror {
            source: source.to_owned(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            positions: BTreeMap::new(),
            seqs: HashMap::new(),
            agent_names: HashMap::new(),
            batch_id,
            stats: Stats::default(),
        })
    }

    /// Empties the mirror and every recorded position (one transaction).
    pub async fn clear(api: &DataApi) -> Result<(), Error> {
        let mut statements: Vec<String> = sql::batch(&sql::MIRROR, toolrank_events::Day(0));
        statements.extend(["DELETE FROM \"AgentTable\"", "DELETE FROM toolrank_mirror_positions", "DELETE FROM toolrank_mirror_batch"].map(String::from));
        api.batch(statements).await
    }

    /// The positions of `source` recorded by the last committed batch: part → position.
    pub async fn positions(api: &DataApi, source: &str) -> Result<BTreeMap<String, String>, Error> {
        let rows = api.query("SELECT part, position FROM toolrank_mirror_positions WHERE source = :source", &[("source", source)]).await?;
        Ok(rows
            .rows
            .into_iter()
            .filter_map(|r| match (&r[0], &r[1]) {
                (crate::Value::Text(p), crate::Value::Text(v)) => Some((p.clone(), v.clone())),
                _ => None,
            })
            .collect())
    }

    /// Queues a change; stale stream records (a sequence number not above the last applied
    /// one for the key) are counted and dropped.
    pub fn push(&mut self, change: ItemChange) {
        let key = (change.pk, change.sk);
        if let Some(seq) = change.seq {
            match self.seqs.get(&key) {
                Some(&last) if seq <= last => {
                    self.stats.stale += 1;
                    return;
                }
                _ => {
                    self.seqs.insert(key.clone(), seq);
                }
            }
        }
        let mut image = change.image;
        if key.1 == METADATA_SK {
            if let Some(item) = image.as_mut() {
                if change.keeps_name {
                    if let Some(name) = self.agent_names.get(&key.0) {
                        item["AgentNM"] = name.clone();
                    }
                } else if let Some(name) = item.get("AgentNM") {
                    self.agent_names.insert(key.0.clone(), name.clone());
                }
            }
        }
        let text = image.map(|v| v.to_string());
        self.pending_bytes += key.0.len() + key.1.len() + text.as_ref().map_or(4, String::len) + 16;
        self.pending.insert(key, text);
    }

    /// Records that everything up to `position` of `part` has been pushed.
    pub fn advance(&mut self, part: &str, position: &str) {
        self.positions.insert(part.to_owned(), position.to_owned());
    }

    /// Whether the queued changes fill a batch.
    pub fn full(&self) -> bool {
        self.pending_bytes >= (MAX_STATEMENTS - FIXED_STATEMENTS) * MAX_STATEMENT_BYTES * 9 / 10
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.positions.is_empty()
    }

    /// Applies the queued changes and positions as one transaction.
    pub async fn flush(&mut self, api: &DataApi) -> Result<(), Error> {
        if self.is_empty() {
            return Ok(());
        }
        let id = literal(&self.batch_id);
        let mut inserts: Vec<String> = Vec::new();
        let mut insert = String::new();
        let (mut written, mut removed) = (0, 0);
        for ((pk, sk), image) in std::mem::take(&mut self.pending) {
            let value = match &image {
                Some(text) => {
                    written += 1;
                    format!("JSON_PARSE({})", literal(text))
                }
                None => {
                    removed += 1;
                    "NULL".to_owned()
                }
            };
            let row = format!("({id}, {}, {}, {value})", literal(&pk), literal(&sk));
            if !insert.is_empty() && insert.len() + row.len() > MAX_STATEMENT_BYTES {
                inserts.push(std::mem::take(&mut insert));
            }
            if insert.is_empty() {
                insert.push_str("INSERT INTO toolrank_mirror_batch VALUES ");
            } else {
                insert.push_str(", ");
            }
            insert.push_str(&row);
        }
        if !insert.is_empty() {
            inserts.push(insert);
        }
        // Rows beyond one batch's statements are staged first: invisible until the final
        // batch applies them with the positions, atomically.
        let session = || SESSION.iter().map(|s| s.to_string()).collect::<Vec<String>>();
        while inserts.len() > MAX_STATEMENTS - FIXED_STATEMENTS {
            let mut staged = session();
            staged.extend(inserts.drain(..MAX_STATEMENTS - FIXED_STATEMENTS));
            api.batch(staged).await?;
        }
        let mut statements = session();
        statements.append(&mut inserts);
        statements.push(format!(
            "DELETE FROM \"AgentTable\" USING toolrank_mirror_batch b WHERE b.batch_id = {id} AND \"AgentTable\".\"PK\" = b.\"PK\" AND \"AgentTable\".\"SK\" = b.\"SK\""
        ));
        statements.push(format!(
            "INSERT INTO \"AgentTable\" SELECT \"PK\", \"SK\", \"value\" FROM toolrank_mirror_batch WHERE batch_id = {id} AND \"value\" IS NOT NULL"
        ));
        statements.push(format!("DELETE FROM toolrank_mirror_batch WHERE batch_id = {id}"));
        let positions = std::mem::take(&mut self.positions);
        if !positions.is_empty() {
            let source = literal(&self.source);
            let parts: Vec<String> = positions.keys().map(|p| literal(p)).collect();
            let rows: Vec<String> = positions.iter().map(|(p, v)| format!("({source}, {}, {})", literal(p), literal(v))).collect();
            statements.push(format!("DELETE FROM toolrank_mirror_positions WHERE source = {source} AND part IN ({})", parts.join(", ")));
            statements.push(format!("INSERT INTO toolrank_mirror_positions VALUES {}", rows.join(", ")));
        }
        api.batch(statements).await?;
        self.pending_bytes = 0;
        self.stats.items_written += written;
        self.stats.items_removed += removed;
        self.stats.batches += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_yields_the_whole_item() {
        let export = br#"{"Item":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"EntityType":{"S":"UserSessPrcToolMappHist"},"TransactDT":{"S":"20250614140605"},"SuccYN":{"S":"Y"},"ToolNM":{"S":"X"},"ResultMsg":{"S":"kept"}}}"#;
        let c = decode(export).unwrap().remove(0).unwrap();
        assert_eq!(c.image.unwrap()["ResultMsg"]["S"], "kept");
        let remove = br#"{"eventName":"REMOVE","dynamodb":{"Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}},"SequenceNumber":"7"}}"#;
        let c = decode(remove).unwrap().remove(0).unwrap();
        assert_eq!((c.image, c.seq), (None, Some(7)));
        let flat = br#"{"op":"upsert","user_id":"U","session_id":"S","process_id":"P","domain_id":"D","agent_id":"A","tool_id":"T","tool_name":"X","success":false,"transact_dt":"20250614140605"}"#;
        let changes: Vec<ItemChange> = decode(flat).unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(changes[0].image.as_ref().unwrap()["GSI1_PK"]["S"], "D");
        assert!(changes[0].keeps_name);
        let hist = changes[1].image.as_ref().unwrap();
        assert_eq!((hist["TransactDT"]["S"].as_str(), hist["SuccYN"]["S"].as_str()), (Some("20250614140605"), Some("N")));
        let lambda = br#"{"Records":[{"eventName":"INSERT","dynamodb":{"NewImage":{"PK":{"S":"A1"},"SK":{"S":"METADATA"},"EntityType":{"S":"Agent"},"GSI1_PK":{"S":"D"}},"SequenceNumber":"1"}},{"eventName":"BOGUS"}]}"#;
        let out = decode(lambda).unwrap();
        assert_eq!(out[0].as_ref().unwrap().image.as_ref().unwrap()["GSI1_PK"]["S"], "D");
        assert_eq!(out[1].as_ref().unwrap_err().index, Some(1));
        // Incremental export lines: the new image at its write time, or a delete.
        let keys = r#""Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}}"#;
        let put = format!(
            r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1750000000000001"}}}},{keys},"NewImage":{{"PK":{{"S":"U#S"}},"SK":{{"S":"P#A#T"}},"EntityType":{{"S":"UserSessPrcToolMappHist"}},"TransactDT":{{"S":"20250614140605"}},"SuccYN":{{"S":"Y"}},"ToolNM":{{"S":"X"}},"ResultMsg":{{"S":"new"}}}}}}"#
        );
        let c = decode(put.as_bytes()).unwrap().remove(0).unwrap();
        assert_eq!((c.image.unwrap()["ResultMsg"]["S"].as_str(), c.seq), (Some("new"), Some(1_750_000_000_000_001)));
        let delete = format!(r#"{{"Metadata":{{"WriteTimestampMicros":{{"N":"1750000000000002"}}}},{keys},"OldImage":{{"PK":{{"S":"U#S"}}}}}}"#);
        let c = decode(delete.as_bytes()).unwrap().remove(0).unwrap();
        assert_eq!((c.pk.as_str(), c.image, c.seq), ("U#S", None, Some(1_750_000_000_000_002)));
    }
}
