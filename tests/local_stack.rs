//! Against the real local stack (`infra/local/up`): Kafka (tansu) and DynamoDB Local.
//! Built with `--features local-stack`; `scripts/test` starts the stack and enables it.
#![cfg(feature = "local-stack")]

use aws_sdk_dynamodb::types::AttributeValue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seed-sample.jsonl");

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through scripts/test, which starts infra/local/up"))
}

fn toolrank(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_toolrank")).args(args).output().expect("toolrank runs");
    assert!(out.status.success(), "toolrank {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_007
}

#[test]
fn setup_is_idempotent() {
    let (topic, dlq, table) = (unique("events"), unique("dead"), unique("AgentTable"));
    let args = ["setup", "--topic", &topic, "--dead-letter-topic", &dlq, "--partitions", "3", "--table", &table];
    let first = String::from_utf8(toolrank(&args).stderr).unwrap();
    assert!(first.contains(&format!("kafka topic created {topic}")) && first.contains(&format!("dynamodb table created {table}")), "{first}");
    let second = String::from_utf8(toolrank(&args).stderr).unwrap();
    assert!(second.contains(&format!("kafka topic exists: {topic}")) && second.contains(&format!("dynamodb table exists: {table}")), "{second}");
}

#[test]
fn produced_records_are_keyed_by_session_and_ordered() {
    let topic = unique("produce");
    toolrank(&["setup", "--topic", &topic, "--dead-letter-topic", &unique("dlq"), "--partitions", "3", "--no-dynamodb"]);
    let out = toolrank(&["produce", "--topic", &topic, SEED]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 34 records"));

    let consumer: BaseConsumer = toolrank_kafka::client_config(&env("TOOLRANK_KAFKA_BROKERS"))
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: Vec<(String, i32, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 34 && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.unwrap();
            let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
            let payload: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
            seen.push((key, msg.partition(), payload["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(seen.len(), 34, "all records arrive");
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    let mut last_seq: HashMap<&str, &str> = HashMap::new();
    for (key, partition, seq) in &seen {
        assert_eq!(*partition_of.entry(key).or_insert(*partition), *partition, "{key} stays in one partition");
        let prev = last_seq.insert(key, seq);
        assert!(prev.is_none_or(|p| p.len() < seq.len() || (p.len() == seq.len() && p < seq.as_str())), "{key} in order");
    }
    assert!(partition_of.contains_key("USR001#SESS20250614001"));
}

#[test]
fn produce_to_dynamodb_writes_the_items() {
    let table = unique("Table");
    toolrank(&["setup", "--table", &table, "--no-kafka"]);
    toolrank(&["produce", "--to", "dynamodb", "--table", &table, SEED]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolrank_dynamodb::client().await;
        let scan = client.scan().table_name(&table).send().await.unwrap();
        assert_eq!(scan.count(), 34);
        let item = client
            .get_item()
            .table_name(&table)
            .key("PK", AttributeValue::S("USR002#SESS20250614001".into()))
            .key("SK", AttributeValue::S("PRC002#AGT001#TL002".into()))
            .send()
            .await
            .unwrap()
            .item
            .expect("hist item written");
        assert_eq!(item["SuccYN"], AttributeValue::S("N".into()));
        assert_eq!(item["ResultMsg"], AttributeValue::S("카페리스트".into()));
        let agents = client
            .query()
            .table_name(&table)
            .index_name("GSI1")
            .key_condition_expression("GSI1_PK = :d AND begins_with(GSI1_SK, :p)")
            .expression_attribute_values(":d", AttributeValue::S("DMN001".into()))
            .expression_attribute_values(":p", AttributeValue::S("AGTSCORE".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(agents.count(), 3, "access pattern 2 over the seed's agents");
    });
}
