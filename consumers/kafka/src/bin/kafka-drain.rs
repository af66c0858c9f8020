//! The broker's raw consume rate: reads a topic from the beginning with a no-op rdkafka
//! consumer until it has been idle for 3 s, and prints messages, seconds and messages/s.
//! `bench/stream.sh` compares `toolrank consume kafka` with it.
//!
//! Usage: kafka-drain BROKERS TOPIC

use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        return Err("usage: kafka-drain BROKERS TOPIC".into());
    };
    let group = format!("kafka-drain-{}", std::process::id());
    let consumer: BaseConsumer = toolrank_kafka::client_config(&brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) || first.is_none() && last.elapsed() < Duration::from_secs(30) {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            let msg = msg?;
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            n += 1;
            bytes += msg.payload_len() as u64;
        }
    }
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    println!("messages {n} bytes {bytes} seconds {secs:.3} rate {:.0}", n as f64 / secs.max(1e-9));
    Ok(())
}
