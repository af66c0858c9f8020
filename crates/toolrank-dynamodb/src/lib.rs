//! The `AgentTable` in DynamoDB: creating it (keys, GSI1, a NEW_AND_OLD_IMAGES stream,
//! TTL) and writing history into it the way an agent application does, so that the
//! table's stream carries the same changes as a replay file.
//!
//! Endpoints and credentials come from the standard AWS environment
//! (`AWS_ENDPOINT_URL_DYNAMODB`, `AWS_REGION`, ...), so DynamoDB Local and AWS work alike.

use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConsumedCapacity, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ReturnConsumedCapacity, ScalarAttributeType, StreamSpecification, StreamViewType, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{self, StreamExt};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use toolrank_events::decode_line;

mod limiter;
mod usage;
pub use limiter::Limiter;
pub use usage::{Cost, Usage};

/// The TTL attribute (epoch seconds) of the seed's retention policy.
pub const TTL_ATTRIBUTE: &str = "ExpireAt";

/// A DynamoDB failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {message}")]
    Aws { what: String, message: String },
    #[error("table {0} did not become ACTIVE within 5 minutes")]
    NotActive(String),
    #[error("{0}")]
    Input(String),
    /// Another consumer took over the scope (a partition moved): this one must let go.
    #[error("{0} is now owned by another consumer")]
    Fenced(String),
    /// A call cut off by its caller's deadline.
    #[error("{0}: no answer in time")]
    Timeout(String),
}

/// An SDK error as [`Error::Aws`], saying what was being done.
pub fn aws<E: std::error::Error + 'static, R: std::fmt::Debug>(what: impl Into<String>) -> impl FnOnce(SdkError<E, R>) -> Error {
    let what = what.into();
    move |e| Error::Aws { what, message: DisplayErrorContext(&e).to_string() }
}

/// Capacity units DynamoDB reports as consumed by writes (every write asks for them with
/// [`TOTAL`]): what the writes cost on an on-demand table, counted by the service itself
/// (a transaction costs twice, an item over 1 KB one unit per KB).
pub const TOTAL: ReturnConsumedCapacity = ReturnConsumedCapacity::Total;

/// A running sum of consumed write capacity units (see [`TOTAL`]), shared by clones.
#[derive(Clone, Debug, Default)]
pub struct Units(Arc<AtomicU64>);

impl Units {
    /// Adds what one response reports (thousandths are kept: reads may be halves).
    pub fn add(&self, consumed: Option<&ConsumedCapacity>) {
        let units = consumed.and_then(ConsumedCapacity::capacity_units).unwrap_or(0.0);
        self.0.fetch_add((units * 1000.0).round() as u64, Ordering::Relaxed);
    }

    /// Adds what a batch or transaction response reports, per table.
    pub fn add_all(&self, consumed: &[ConsumedCapacity]) {
        consumed.iter().for_each(|c| self.add(Some(c)));
    }

    /// The units so far.
    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// A client configured from the environment (see [`sdk_config`]).
pub async fn client() -> Client {
    client_with_usage().await.0
}

/// A client as [`client`] makes it, and what its requests cost ([`Usage`]), which the
/// metrics also show.
pub async fn client_with_usage() -> (Client, Usage) {
    metrics::describe_counter!("toolrank_dynamodb_read_units_total", "Read capacity units DynamoDB reported consumed, by operation (whole units).");
    let usage = Usage::default();
    let config = aws_sdk_dynamodb::config::Builder::from(&sdk_config().await).interceptor(usage::Counting(usage.clone())).build();
    (Client::from_conf(config), usage)
}

/// The AWS configuration from the environment, shared by every AWS client of toolrank.
///
/// Every attempt times out after 10 s (the SDK has no read timeout by default, and one
/// lost response would stall a consumer) and is retried with the SDK's backoff.
pub async fn sdk_config() -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(30))
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts).load().await
}

/// Whether the table was made or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableStatusReport {
    Created,
    Existed,
}

/// Creates `table` unless it exists: `PK`/`SK` strings, `GSI1` on `GSI1_PK`/`GSI1_SK`
/// (all attributes projected), on-demand billing, a NEW_AND_OLD_IMAGES stream unless
/// `stream` is false (consumers fed by Kafka do not read it), and TTL on
/// [`TTL_ATTRIBUTE`]. Waits until it is ACTIVE. Idempotent.
pub async fn create_table(client: &Client, table: &str, stream: bool) -> Result<TableStatusReport, Error> {
    let gsi = GlobalSecondaryIndex::builder()
        .index_name("GSI1")
        .key_schema(key("GSI1_PK", KeyType::Hash))
        .key_schema(key("GSI1_SK", KeyType::Range))
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()
        .expect("valid index");
    let mut request = keyed_table(client, table).attribute_definitions(attr("GSI1_PK")).attribute_definitions(attr("GSI1_SK")).global_secondary_indexes(gsi);
    if stream {
        request = request.stream_specification(
            StreamSpecification::builder().stream_enabled(true).stream_view_type(StreamViewType::NewAndOldImages).build().expect("valid stream spec"),
        );
    }
    let status = create(client, request, table).await?;
    let ttl = client.describe_time_to_live().table_name(table).send().await.map_err(aws("describing TTL"))?;
    let enabled = ttl.time_to_live_description().and_then(|d| d.attribute_name()).is_some_and(|a| a == TTL_ATTRIBUTE);
    if !enabled {
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(TimeToLiveSpecification::builder().enabled(true).attribute_name(TTL_ATTRIBUTE).build().expect("valid"))
            .send()
            .await
            .map_err(aws(format!("enabling TTL on {table}")))?;
    }
    Ok(status)
}

/// BatchWriteItem in groups of 25, resending unprocessed items with backoff.
pub async fn batch_write(
    client: &Client,
    table: &str,
    requests: Vec<aws_sdk_dynamodb::types::WriteRequest>,
    units: &Units,
) -> Result<(), SdkError<aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemError, aws_sdk_dynamodb::config::http::HttpResponse>> {
    // Chunks of 25 (the API's limit), several in flight; unprocessed items are resent
    // with backoff.
    let chunks: Vec<Vec<_>> = requests.chunks(25).map(<[_]>::to_vec).collect();
    // Boxed, so that the callers' futures are provably `Send` (a stream of closures over
    // borrowed data is not).
    let sends: Vec<BoxFuture<'_, Result<(), _>>> = chunks
        .into_iter()
        .map(|mut pending| {
            async move {
                let mut backoff = toolrank_backoff::Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
                while !pending.is_empty() {
                    let out = client.batch_write_item().request_items(table, pending).return_consumed_capacity(TOTAL).send().await?;
                    units.add_all(out.consumed_capacity());
                    pending = out.unprocessed_items.and_then(|mut m| m.remove(table)).unwrap_or_default();
                    if !pending.is_empty() {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                Ok(())
            }
            .boxed()
        })
        .collect();
    let results: Vec<Result<(), _>> = stream::iter(sends).buffer_unordered(8).collect().await;
    results.into_iter().collect()
}

/// Creates a table keyed by `PK`/`SK` strings, on-demand, with no stream, unless it
/// exists (the pipeline's state table is one). Idempotent.
pub async fn create_keyed_table(client: &Client, table: &str) -> Result<TableStatusReport, Error> {
    create(client, keyed_table(client, table), table).await
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder().attribute_name(name).key_type(kind).build().expect("valid key")
}

fn attr(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build().expect("valid attribute")
}

/// A CreateTable request for string keys `PK`/`SK`, on-demand.
fn keyed_table(client: &Client, table: &str) -> aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder {
    client
        .create_table()
        .table_name(table)
        .key_schema(key("PK", KeyType::Hash))
        .key_schema(key("SK", KeyType::Range))
        .attribute_definitions(attr("PK"))
        .attribute_definitions(attr("SK"))
        .billing_mode(BillingMode::PayPerRequest)
}

/// Sends `request`, treating an existing table as success, and waits until it is ACTIVE.
async fn create(
    client: &Client,
    request: aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder,
    table: &str,
) -> Result<TableStatusReport, Error> {
    let status = match request.send().await {
        Ok(_) => TableStatusReport::Created,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => TableStatusReport::Existed,
        Err(e) => return Err(aws(format!("creating table {table}"))(e)),
    };
    wait_active(client, table).await?;
    Ok(status)
}

/// How long a new table may take to become ACTIVE.
const ACTIVE_WITHIN: Duration = Duration::from_secs(300);

/// Waits until `table` is ACTIVE, with the SDK's waiter (its backoff between polls).
async fn wait_active(client: &Client, table: &str) -> Result<(), Error> {
    use aws_sdk_dynamodb::client::Waiters;
    client.wait_until_table_exists().table_name(table).wait(ACTIVE_WITHIN).await.map_err(|e| match e {
        aws_sdk_dynamodb::waiters::table_exists::WaitUntilTableExistsError::ExceededMaxWait(_) => Error::NotActive(table.into()),
        e => Error::Aws { what: format!("waiting for table {table}"), message: DisplayErrorContext(&e).to_string() },
    })?;
    Ok(())
}

/// One write an agent application would make.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Put the whole item.
    Put(HashMap<String, AttributeValue>),
    /// Set these attributes of an item, keeping the others (a flat event's agent upsert).
    Update {
        pk: String,
        sk: String,
        set: Vec<(String, String)>,
    },
    Delete {
        pk: String,
        sk: String,
    },
}

/// Converts DynamoDB's typed JSON (`{"S": ...}`, `{"N": ...}`, `{"M": {...}}`, ...).
pub fn attribute_value(v: &Value) -> Result<AttributeValue, String> {
    let obj = v.as_object().filter(|o| o.len() == 1).ok_or_else(|| format!("not a typed attribute value: {v}"))?;
    let (tag, inner) = obj.iter().next().expect("one entry");
    let text = || inner.as_str().map(str::to_owned).ok_or_else(|| format!("{tag} value must be a string"));
    let strings = || {
        inner
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| format!("{tag} value must be a list of strings"))
    };
    Ok(match tag.as_str() {
        "S" => AttributeValue::S(text()?),
        "N" => AttributeValue::N(text()?),
        "BOOL" => AttributeValue::Bool(inner.as_bool().ok_or("BOOL value must be true or false")?),
        "NULL" => AttributeValue::Null(true),
        "SS" => AttributeValue::Ss(strings()?),
        "NS" => AttributeValue::Ns(strings()?),
        "M" => AttributeValue::M(item(inner.as_object().ok_or("M value must be an object")?)?),
        "L" => AttributeValue::L(inner.as_array().ok_or("L value must be a list")?.iter().map(attribute_value).collect::<Result<_, _>>()?),
        other => return Err(format!("unsupported attribute type {other}")),
    })
}

#[doc(hidden)]
pub mod __reexport {
    pub use base64;
    pub use serde_json;
}

/// Defines `fn $name(&$attribute_value) -> serde_json::Value`: DynamoDB's typed JSON
/// (`{"S": ...}`, `{"M": {...}}`, binary as base64) of an SDK attribute value. A macro
/// because the tables SDK and the streams SDK each have their own `AttributeValue`.
#[macro_export]
macro_rules! typed_json_fn {
    ($vis:vis $name:ident, $av:path) => {
        $vis fn $name(v: &$av) -> $crate::__reexport::serde_json::Value {
            use $crate::__reexport::base64::Engine as _;
            use $crate::__reexport::serde_json::{json, Map};
            use $av as A;
            let b64 = |b: &[u8]| $crate::__reexport::base64::engine::general_purpose::STANDARD.encode(b);
            match v {
                A::S(s) => json!({ "S": s }),
                A::N(n) => json!({ "N": n }),
                A::B(b) => json!({ "B": b64(b.as_ref()) }),
                A::Bool(b) => json!({ "BOOL": b }),
                A::Null(b) => json!({ "NULL": b }),
                A::L(l) => json!({ "L": l.iter().map($name).collect::<Vec<_>>() }),
                A::M(m) => json!({ "M": m.iter().map(|(k, v)| (k.clone(), $name(v))).collect::<Map<_, _>>() }),
                A::Ss(ss) => json!({ "SS": ss }),
                A::Ns(ns) => json!({ "NS": ns }),
                A::Bs(bs) => json!({ "BS": bs.iter().map(|b| b64(b.as_ref())).collect::<Vec<_>>() }),
                _ => json!({ "NULL": true }),
            }
        }
    };
}

typed_json_fn!(pub attribute_json, AttributeValue);

/// An item as DynamoDB's typed JSON, as in exports and stream records.
pub fn item_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(item.iter().map(|(k, v)| (k.clone(), attribute_json(v))).collect())
}

fn item(map: &Map<String, Value>) -> Result<HashMap<String, AttributeValue>, String> {
    map.iter().map(|(k, v)| Ok((k.clone(), attribute_value(v)?))).collect()
}

fn key_of(keys: &Value) -> Result<(String, String), String> {
    let s = |k: &str| keys[k]["S"].as_str().map(str::to_owned).ok_or_else(|| format!("missing {k}"));
    Ok((s("PK")?, s("SK")?))
}

fn stream_op(rec: &Value) -> Result<WriteOp, String> {
    let data = &rec["dynamodb"];
    match rec["eventName"].as_str() {
        Some("INSERT" | "MODIFY") => Ok(WriteOp::Put(item(data["NewImage"].as_object().ok_or("missing NewImage")?)?)),
        Some("REMOVE") => {
            let (pk, sk) = key_of(&data["Keys"])?;
            Ok(WriteOp::Delete { pk, sk })
        }
        _ => Err("unknown eventName".into()),
    }
}

/// The writes that reproduce one replay-format line in the table. The line must decode
/// (see `toolrank_events::decode_line`); bad lines are refused, never half written.
pub fn write_ops(line: &[u8]) -> Result<Vec<WriteOp>, Error> {
    let mut first_error = None;
    decode_line(line, &mut |rec| {
        if let Err(e) = rec.result {
            first_error.get_or_insert(e.to_string());
        }
    })
    .map_err(|e| Error::Input(e.to_string()))?;
    if let Some(e) = first_error {
        return Err(Error::Input(e));
    }
    let v: Value = serde_json::from_slice(line).map_err(|e| Error::Input(e.to_string()))?;
    let ops = if let Some(it) = v.get("Item") {
        vec![WriteOp::Put(item(it.as_object().ok_or("Item must be an object").map_err(|e| Error::Input(e.into()))?).map_err(Error::Input)?)]
    } else if let Some(records) = v.get("Records").and_then(Value::as_array) {
        records.iter().map(stream_op).collect::<Result<_, _>>().map_err(Error::Input)?
    } else if v.get("eventName").is_some() || v.get("dynamodb").is_some() {
        vec![stream_op(&v).map_err(Error::Input)?]
    } else if v.get("op").is_some() || v.get("user_id").is_some() || v.get("event_id").is_some() {
        flat_ops(&v)
    } else {
        vec![WriteOp::Put(item(v.as_object().expect("decoded lines are objects")).map_err(Error::Input)?)]
    };
    Ok(ops)
}

fn flat_ops(v: &Value) -> Vec<WriteOp> {
    let f = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let (pk, sk) = (format!("{}#{}", f("user_id"), f("session_id")), format!("{}#{}#{}", f("process_id"), f("agent_id"), f("tool_id")));
    if v["op"].as_str() == Some("delete") {
        return vec![WriteOp::Delete { pk, sk }];
    }
    let mut ops = Vec::new();
    if let Some(domain) = v["domain_id"].as_str() {
        let mut set = vec![("EntityType".to_owned(), "Agent".to_owned()), ("GSI1_PK".to_owned(), domain.to_owned())];
        if let Some(name) = v["agent_name"].as_str() {
            set.push(("AgentNM".to_owned(), name.to_owned()));
        }
        ops.push(WriteOp::Update { pk: f("agent_id"), sk: "METADATA".into(), set });
    }
    let success = match &v["success"] {
        Value::Bool(b) => *b,
        other => other.as_str() == Some("Y") || other.as_str() == Some("true"),
    };
    let dt = toolrank_events::Timestamp::parse(&f("transact_dt")).map(|t| t.packed.to_string()).unwrap_or_default();
    let mut it: HashMap<String, AttributeValue> = [
        ("PK", pk),
        ("SK", sk),
        ("EntityType", "UserSessPrcToolMappHist".to_owned()),
        ("ToolNM", f("tool_name")),
        ("TransactDT", dt),
        ("SuccYN", if success { "Y" } else { "N" }.to_owned()),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_owned(), AttributeValue::S(s)))
    .collect();
    for (field, attr) in [("tool_values", "ToolValues"), ("result_message", "ResultMsg")] {
        if let Some(s) = v[field].as_str() {
            it.insert(attr.into(), AttributeValue::S(s.into()));
        }
    }
    ops.push(WriteOp::Put(it));
    ops
}

/// Applies one write, with the SDK's retries and backoff.
pub async fn write(client: &Client, table: &str, op: WriteOp) -> Result<(), Error> {
    match op {
        WriteOp::Put(item) => {
            client.put_item().table_name(table).set_item(Some(item)).send().await.map_err(aws("PutItem"))?;
        }
        WriteOp::Delete { pk, sk } => {
            client.delete_item().table_name(table).key("PK", AttributeValue::S(pk)).key("SK", AttributeValue::S(sk)).send().await.map_err(aws("DeleteItem"))?;
        }
        WriteOp::Update { pk, sk, set } => {
            let mut req = client.update_item().table_name(table).key("PK", AttributeValue::S(pk)).key("SK", AttributeValue::S(sk));
            let mut parts = Vec::new();
            for (i, (name, value)) in set.into_iter().enumerate() {
                parts.push(format!("#a{i} = :v{i}"));
                req = req.expression_attribute_names(format!("#a{i}"), name).expression_attribute_values(format!(":v{i}"), AttributeValue::S(value));
            }
            req.update_expression(format!("SET {}", parts.join(", "))).send().await.map_err(aws("UpdateItem"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_the_writes_an_application_makes() {
        let export = br#"{"Item":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"},"EntityType":{"S":"UserSessPrcToolMappHist"},"ToolNM":{"S":"x"},"TransactDT":{"S":"20250614140605"},"SuccYN":{"S":"Y"},"Score":{"N":"3"},"Tags":{"L":[{"S":"a"}]}}}"#;
        let ops = write_ops(export).unwrap();
        let WriteOp::Put(item) = &ops[0] else { panic!("{ops:?}") };
        assert_eq!(item["Score"], AttributeValue::N("3".into()));
        assert_eq!(item["Tags"], AttributeValue::L(vec![AttributeValue::S("a".into())]));
        let remove = br#"{"eventName":"REMOVE","dynamodb":{"Keys":{"PK":{"S":"U#S"},"SK":{"S":"P#A#T"}},"SequenceNumber":"9"}}"#;
        assert_eq!(write_ops(remove).unwrap(), vec![WriteOp::Delete { pk: "U#S".into(), sk: "P#A#T".into() }]);
        let flat = br#"{"op":"upsert","user_id":"U","session_id":"S","process_id":"P","domain_id":"D","agent_id":"A","tool_id":"T","tool_name":"x","success":false,"transact_dt":"2025-06-14T14:06:05Z"}"#;
        let ops = write_ops(flat).unwrap();
        assert!(matches!(&ops[0], WriteOp::Update { pk, .. } if pk == "A"));
        let WriteOp::Put(item) = &ops[1] else { panic!() };
        assert_eq!((item["TransactDT"].as_s().unwrap().as_str(), item["SuccYN"].as_s().unwrap().as_str()), ("20250614140605", "N"));
        assert!(matches!(write_ops(b"{\"eventName\":\"INSERT\"}"), Err(Error::Input(_))));
    }
}
