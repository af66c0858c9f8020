//! `toolrank mirror --follow kafka`: the mirror fed by a topic, resuming from the offsets
//! its last committed batch recorded in the warehouse (no consumer-group commits: the
//! offsets live in the same transaction as the rows they produced).

use super::line::mirror_line;
use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use toolrank_dead_letters::DeadLetters;
use toolrank_warehouse::mirror::Mirror;
use toolrank_warehouse::DataApi;

/// How long changes may wait before they are applied.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub fn follow(
    rt: &tokio::runtime::Runtime,
    api: &DataApi,
    kafka: &toolrank_kafka::Connection,
    topic: &str,
    until_idle: Option<f64>,
    stop: &AtomicBool,
    dead: &mut DeadLetters,
) -> Result<(Mirror, u64)> {
    let source = format!("kafka:{topic}");
    let mut mirror = rt.block_on(Mirror::open(api, &source))?;
    let positions = rt.block_on(Mirror::positions(api, &source))?;
    let context = kafka.context();
    let consumer: BaseConsumer<toolrank_kafka::Context> = kafka
        .client_config()
        .set("group.id", "toolrank-mirror")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(context.clone())
        .with_context(|| format!("connecting to Kafka at {}", kafka.brokers))?;
    context.give_token(consumer.client()).map_err(anyhow::Error::msg)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).with_context(|| format!("reading the metadata of topic {topic}"))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions (create it with `toolrank setup`)");
    }
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let offset = match positions.get(&p.to_string()) {
            Some(next) => Offset::Offset(next.parse().with_context(|| format!("stored offset {next:?} of partition {p}"))?),
            None => Offset::Beginning,
        };
        assignment.add_partition_offset(topic, *p, offset)?;
    }
    consumer.assign(&assignment)?;
    tracing::info!(topic, partitions = partitions.len(), resumed = positions.len(), "following");

    let idle = until_idle.map(Duration::from_secs_f64);
    let (mut last_message, mut last_flush) = (Instant::now(), Instant::now());
    let mut bad = 0;
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                last_message = Instant::now();
                let at = format!("{topic}[{}]", msg.partition());
                if let Some(payload) = msg.payload() {
                    mirror_line(&mut mirror, payload, &at, msg.offset() as u64, dead, &mut bad)?;
                }
                mirror.advance(&msg.partition().to_string(), &(msg.offset() + 1).to_string());
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka poll error; retrying"),
            None => {
                if idle.is_some_and(|idle| last_message.elapsed() >= idle) {
                    break;
                }
            }
        }
        if mirror.full() || (!mirror.is_empty() && last_flush.elapsed() >= FLUSH_EVERY) {
            rt.block_on(mirror.flush(api))?;
            last_flush = Instant::now();
        }
    }
    rt.block_on(mirror.flush(api))?;
    Ok((mirror, bad))
}
