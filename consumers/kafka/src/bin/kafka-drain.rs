//! The broker's own figures, for `bench/stream.sh` to compare `toolrank consume kafka` with:
//! - `kafka-drain BROKERS TOPIC`: the raw consume rate. Reads the topic from the beginning
//!   with a no-op rdkafka consumer until idle for 3 s; prints messages, seconds and
//!   messages/s.
//! - `kafka-drain BROKERS TOPIC --latency`: the raw delivery latency. Reads only what
//!   arrives after it joined, until idle for 3 s, and prints p50/p99/max of the time from
//!   each message's creation (its Kafka timestamp) to its receipt: the part of toolrank's
//!   latency that is the producer's, the broker's and the client's.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        return Err("usage: kafka-drain BROKERS TOPIC [--latency]".into());
    };
    let latency = match args.next().as_deref() {
        None => false,
        Some("--latency") => true,
        Some(other) => return Err(format!("unknown argument {other}").into()),
    };
    let group = format!("kafka-drain-{}", std::process::id());
    let consumer: BaseConsumer = toolrank_kafka::Connection::plain(&brokers)
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", if latency { "latest" } else { "earliest" })
        // As `toolrank consume kafka` sets it (--fetch-wait-ms, the same variable).
        .set("fetch.wait.max.ms", std::env::var("TOOLRANK_FETCH_WAIT_MS").unwrap_or_else(|_| toolrank_kafka::FETCH_WAIT_MS.to_string()))
        .create()?;
    consumer.subscribe(&[&topic])?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut delays = Vec::new();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let patience = if latency { Duration::from_secs(600) } else { Duration::from_secs(30) };
    while last.elapsed() < Duration::from_secs(3) || first.is_none() && last.elapsed() < patience {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            let msg = msg?;
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            n += 1;
            bytes += msg.payload_len() as u64;
            if let Some(created) = msg.timestamp().to_millis() {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
                delays.push(now - created);
            }
        }
    }
    if latency {
        delays.sort_unstable();
        let q = |p: f64| delays.get(((delays.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0);
        println!("messages {n} latency p50 {} ms, p99 {} ms, max {} ms", q(0.5), q(0.99), q(1.0));
    } else {
        let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
        println!("messages {n} bytes {bytes} seconds {secs:.3} rate {:.0}", n as f64 / secs.max(1e-9));
    }
    Ok(())
}
