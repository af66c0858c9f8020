//! `toolrank replay --from-kafka`: a topic's records (from a time, or the beginning, up
//! to a time or the end as it was when the replay started) instead of files.

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use toolrank_events::{decode_line, Change, Day, DeadLetter, Format};

/// Where a replay from Kafka reads.
#[derive(clap::Args)]
pub struct KafkaArgs {
    /// Read the records of --topic instead of files.
    #[arg(long, requires = "topic")]
    pub from_kafka: bool,
    /// The topic to replay (with --from-kafka).
    #[arg(long, env = "TOOLRANK_TOPIC")]
    pub topic: Option<String>,
    #[command(flatten)]
    kafka: crate::kafka_connection::ConnectionArgs,
    /// Start at each partition's first record at or after this time (RFC 3339 such as
    /// 2025-07-14T00:00:00Z, a date, or Unix milliseconds).
    #[arg(long, conflicts_with = "from_beginning", value_name = "TIMESTAMP")]
    since: Option<String>,
    /// Start at each partition's first record (the default).
    #[arg(long)]
    from_beginning: bool,
    /// Stop before each partition's first record after this time (default: the end of
    /// the partition when the replay started).
    #[arg(long, value_name = "TIMESTAMP")]
    until: Option<String>,
}

/// Milliseconds since the Unix epoch of `2025-07-14T01:02:03Z`, `2025-07-14` or digits.
pub fn parse_time(text: &str) -> Result<i64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().context("milliseconds out of range");
    }
    let bad = || anyhow::anyhow!("{text:?} is not a time: use 2025-07-14T01:02:03Z, 2025-07-14 or Unix milliseconds");
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let day = Day::parse_iso(date).ok_or_else(bad)?;
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let parts: Vec<i64> = time.split(':').map(|p| p.parse::<f64>().map(|v| v as i64)).collect::<Result<_, _>>().map_err(|_| bad())?;
    let [h, m, s] = parts[..] else { return Err(bad()) };
    if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&s) {
        return Err(bad());
    }
    Ok(((i64::from(day.0) * 86_400) + h * 3600 + m * 60 + s) * 1000)
}

/// Hands every record of the range to `each`: a change, or the dead letter of one that
/// does not decode. Returns how many records had each format, and the bytes read.
pub fn ingest(args: &KafkaArgs, topic: &str, each: &mut dyn FnMut(Result<&Change<'_>, DeadLetter>) -> Result<()>) -> Result<([u64; Format::ALL.len()], u64)> {
    let since = args.since.as_deref().map(parse_time).transpose()?;
    let until = args.until.as_deref().map(parse_time).transpose()?;
    let kafka = args.kafka.connect()?;
    let context = kafka.context();
    let consumer: BaseConsumer<toolrank_kafka::Context> = kafka
        .client_config()
        .set("group.id", format!("toolrank-replay-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(context.clone())
        .with_context(|| format!("connecting to Kafka at {}", kafka.brokers))?;
    context.give_token(consumer.client()).map_err(anyhow::Error::msg)?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    // Where each partition starts, and its end as of now.
    let mut starts = TopicPartitionList::new();
    for &p in &partitions {
        starts.add_partition_offset(topic, p, since.map_or(Offset::Beginning, Offset::Offset))?;
    }
    if since.is_some() {
        starts = consumer.offsets_for_times(starts, timeout).context("finding offsets by time")?;
    }
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for e in starts.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let start = match e.offset() {
            Offset::Offset(o) => o,
            Offset::Beginning => low,
            _ => high, // nothing at or after --since
        };
        if start < high {
            ends.insert(e.partition(), high);
            assignment.add_partition_offset(topic, e.partition(), Offset::Offset(start))?;
        }
    }
    consumer.assign(&assignment)?;
    let (mut by_format, mut bytes, mut last_progress) = ([0u64; Format::ALL.len()], 0u64, Instant::now());
    while !ends.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            if last_progress.elapsed() > Duration::from_secs(60) {
                bail!("no record from {topic} for 60 s with partitions {:?} unfinished", ends.keys().collect::<Vec<_>>());
            }
            continue;
        };
        let msg = msg.with_context(|| format!("reading {topic}"))?;
        last_progress = Instant::now();
        let (partition, offset) = (msg.partition(), msg.offset());
        let Some(&end) = ends.get(&partition) else { continue };
        let time = msg.timestamp().to_millis();
        let past_until = until.is_some_and(|u| time.is_some_and(|t| t > u));
        // The broker's time index is a starting point (some brokers answer offset 0): a
        // record before --since is still skipped here.
        let before_since = since.is_some_and(|s| time.is_some_and(|t| t < s));
        if !past_until && !before_since {
            if let Some(payload) = msg.payload() {
                bytes += payload.len() as u64;
                let letter = |record, reason: String, raw: Option<&str>| DeadLetter {
                    source: format!("{topic}[{partition}]"),
                    line: offset as u64,
                    record,
                    position: None,
                    reason,
                    raw: raw.map_or_else(|| String::from_utf8_lossy(payload).into_owned(), str::to_owned),
                };
                let mut results = Vec::new();
                match decode_line(payload, &mut |rec| results.push(rec.result.map_err(|e| letter(rec.index, e.to_string(), rec.raw)))) {
                    Ok(format) => by_format[format as usize] += 1,
                    Err(e) => results.push(Err(letter(None, e.to_string(), None))),
                }
                for r in results {
                    match r {
                        Ok(change) => each(Ok(&change))?,
                        Err(letter) => each(Err(letter))?,
                    }
                }
            }
        }
        if past_until || offset + 1 >= end {
            ends.remove(&partition);
        }
    }
    Ok((by_format, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("0").unwrap(), 0);
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_time("1970-01-01T01:00:01Z").unwrap(), 3_601_000);
        for bad in ["", "yesterday", "1970-01-01T01:00:01", "1970-13-01", "1970-01-01T25:00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
