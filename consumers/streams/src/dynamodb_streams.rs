//! The DynamoDB Streams API (aws-sdk-dynamodbstreams) as a [`ShardSource`].

use crate::source::{Page, ShardInfo, ShardSource, SourceError, StreamRecord};
use aws_sdk_dynamodbstreams::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;
use std::borrow::Cow;
use std::collections::HashMap;
use toolrank_engine::Engine;
use toolrank_events::{stream_record_change, Attr, Image};
use toolrank_live::{apply_change, Summary};

/// The stream of one table.
pub struct DynamoStreams {
    client: Client,
    arn: String,
}

impl DynamoStreams {
    /// The latest stream of `table` (its `LatestStreamArn`).
    pub async fn of_table(config: &aws_config::SdkConfig, table: &str) -> Result<DynamoStreams, SourceError> {
        let tables = aws_sdk_dynamodb::Client::new(config);
        let described = tables
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| SourceError::Other(format!("describing table {table}: {}", DisplayErrorContext(&e))))?;
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .ok_or_else(|| SourceError::Other(format!("table {table} has no stream: enable one with NEW_AND_OLD_IMAGES (toolrank setup does)")))?;
        Ok(DynamoStreams { client: Client::new(config), arn: arn.to_owned() })
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(what: &str) -> impl FnOnce(SdkError<E, R>) -> SourceError + '_ {
    move |e| match e.code() {
        Some("ExpiredIteratorException") => SourceError::Expired,
        Some("TrimmedDataAccessException") => SourceError::Trimmed(format!("{what}: {}", DisplayErrorContext(&e))),
        _ => SourceError::Other(format!("{what}: {}", DisplayErrorContext(&e))),
    }
}

impl ShardSource for DynamoStreams {
    type Record = Record;

    fn name(&self) -> &str {
        &self.arn
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_stream()
                .stream_arn(&self.arn)
                .set_exclusive_start_shard_id(start)
                .send()
                .await
                .map_err(classify("describing the stream"))?;
            let Some(desc) = page.stream_description else { break };
            for s in desc.shards() {
                if let Some(id) = s.shard_id() {
                    out.push(ShardInfo { id: id.to_owned(), parent: s.parent_shard_id().map(str::to_owned), adjacent_parent: None });
                }
            }
            start = desc.last_evaluated_shard_id;
            if start.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn iterator(&self, shard: &str, after: Option<&str>) -> Result<String, SourceError> {
        let req = self.client.get_shard_iterator().stream_arn(&self.arn).shard_id(shard);
        let req = match after {
            Some(seq) => req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq),
            None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let got = req.send().await.map_err(classify(&format!("getting an iterator of {shard}")))?;
        got.shard_iterator.ok_or_else(|| SourceError::Other(format!("no iterator for {shard}")))
    }

    async fn read(&self, iterator: &str) -> Result<Page<Record>, SourceError> {
        let got = self.client.get_records().shard_iterator(iterator).limit(1000).send().await.map_err(classify("reading records"))?;
        Ok(Page { records: got.records.unwrap_or_default(), next: got.next_shard_iterator })
    }
}

fn attr(v: &AttributeValue) -> Attr<'_> {
    let kind = match v {
        AttributeValue::S(s) => return Attr::S(Cow::Borrowed(s)),
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Null(_) => "NULL",
        AttributeValue::L(_) => "L",
        AttributeValue::M(_) => "M",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
        _ => "unknown",
    };
    Attr::Other(kind.to_owned())
}

/// The attributes the engine reads, borrowed from the SDK's map.
fn image(m: &HashMap<String, AttributeValue>) -> Image<'_> {
    let get = |k: &str| m.get(k).map(attr);
    Image {
        pk: get("PK"),
        sk: get("SK"),
        entity_type: get("EntityType"),
        transact_dt: get("TransactDT"),
        succ_yn: get("SuccYN"),
        tool_nm: get("ToolNM"),
        agent_nm: get("AgentNM"),
        gsi1_pk: get("GSI1_PK"),
    }
}

impl StreamRecord for Record {
    fn sequence(&self) -> &str {
        self.dynamodb().and_then(|d| d.sequence_number()).unwrap_or("")
    }

    fn apply(&self, engine: &mut Engine, summary: &mut Summary) -> Result<Option<i64>, String> {
        let name = self.event_name().map(|n| n.as_str()).ok_or("missing eventName")?;
        let data = self.dynamodb().ok_or("missing dynamodb")?;
        // A TTL deletion is made by the DynamoDB service.
        let ttl = self.user_identity().is_some_and(|u| u.r#type() == Some("Service") && u.principal_id() == Some("dynamodb.amazonaws.com"));
        let change = stream_record_change(name, data.keys.as_ref().map(image), data.new_image.as_ref().map(image), data.sequence_number(), ttl)
            .map_err(|e| e.to_string())?;
        apply_change(engine, &change, summary);
        Ok(data.approximate_creation_date_time().and_then(|t| t.to_millis().ok()))
    }

    fn describe(&self) -> String {
        record_json(self).to_string()
    }

    /// DynamoDB's own count (`SizeBytes`: keys and images).
    fn size(&self) -> usize {
        self.dynamodb().and_then(|d| d.size_bytes()).map_or(0, |b| b.max(0) as usize)
    }
}

/// A record as Lambda delivers it (eventName, dynamodb.Keys/NewImage/SequenceNumber,
/// userIdentity): one line of the replay formats, for dead letters and for `toolrank
/// mirror`, which keeps whole item images.
pub fn record_json(r: &Record) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let map = |m: &HashMap<String, AttributeValue>| Value::Object(m.iter().map(|(k, v)| (k.clone(), attribute_json(v))).collect::<Map<_, _>>());
    let mut dynamodb = Map::new();
    if let Some(d) = r.dynamodb() {
        if let Some(k) = &d.keys {
            dynamodb.insert("Keys".into(), map(k));
        }
        if let Some(n) = &d.new_image {
            dynamodb.insert("NewImage".into(), map(n));
        }
        if let Some(seq) = d.sequence_number() {
            dynamodb.insert("SequenceNumber".into(), json!(seq));
        }
    }
    let mut out = json!({ "eventName": r.event_name().map(|n| n.as_str()), "dynamodb": dynamodb });
    if let Some(u) = r.user_identity() {
        out["userIdentity"] = json!({ "type": u.r#type(), "principalId": u.principal_id() });
    }
    out
}

toolrank_dynamodb::typed_json_fn!(attribute_json, aws_sdk_dynamodbstreams::types::AttributeValue);
