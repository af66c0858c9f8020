//! A Valkey cluster (three nodes, infra/local/up) as the Valkey sink: the namespace's keys
//! share a hash tag, flushes stay one transaction on the slot's owner, and the sink
//! follows the slot when it moves to another node mid-stream.

use crate::support::*;
use std::time::{Duration, Instant};

fn cluster_live(partitions: &str) -> Live {
    Live::with_env(partitions, vec![("TOOLRANK_VALKEY_URL", env("TOOLRANK_TEST_VALKEY_CLUSTER_URL"))])
}

fn node(port: &str) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap()
}

#[test]
fn the_seed_into_a_valkey_cluster_equals_replay() {
    let live = cluster_live("3");
    live.seed_reaches_both_sinks(Some(&env("TOOLRANK_TEST_VALKEY_CLUSTER_URL")));
    // Every key of the namespace is in its hash tag's slot.
    let ports: Vec<String> = env("TOOLRANK_TEST_VALKEY_CLUSTER_PORTS").split_whitespace().map(str::to_owned).collect();
    let mut keys = Vec::new();
    for port in &ports {
        let mut conn = node(port);
        keys.extend(redis::cmd("KEYS").arg(format!("*{}*", live.namespace)).query::<Vec<String>>(&mut conn).unwrap());
    }
    assert!(keys.len() > 10 && keys.iter().all(|k| k.starts_with(&format!("{{{}}}:", live.namespace))), "{keys:?}");
}

/// 4,000 generated sessions (modifies, removes, redeliveries) stream into the cluster
/// while the namespace's slot migrates to another node (CLUSTER SETSLOT, MIGRATE): the
/// sink follows it (the last third of the history arrives once the slot has moved, so
/// the sink's next transaction meets the old owner's MOVED), nothing is lost, and both
/// sinks equal replay.
#[test]
fn a_slot_migration_mid_stream_loses_nothing() {
    let live = cluster_live("2");
    let history = generated(&live, "4000", "29");
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (before, after) = (live.dir.path().join("before.jsonl"), live.dir.path().join("after.jsonl"));
    std::fs::write(&before, lines[..lines.len() * 2 / 3].join("\n")).unwrap();
    std::fs::write(&after, lines[lines.len() * 2 / 3..].join("\n")).unwrap();
    let producer = live.producer("2500", before.to_str().unwrap());
    let consumer = live.consumer(&[]);
    let ports: Vec<String> = env("TOOLRANK_TEST_VALKEY_CLUSTER_PORTS").split_whitespace().map(str::to_owned).collect();
    let mut conns: Vec<redis::Connection> = ports.iter().map(|p| node(p)).collect();
    let tag = format!("{{{}}}", live.namespace);
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&tag).query(&mut conns[0]).unwrap();
    let ids: Vec<String> = conns.iter_mut().map(|c| redis::cmd("CLUSTER").arg("MYID").query(c).unwrap()).collect();
    let owner = |conns: &mut Vec<redis::Connection>| {
        (0..conns.len()).find(|&i| redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query::<i64>(&mut conns[i]).unwrap() > 0)
    };
    // Wait until the sink has written a good part of the stream into the slot.
    let deadline = Instant::now() + Duration::from_secs(180);
    let from = loop {
        if let Some(i) = owner(&mut conns) {
            let n: i64 = redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query(&mut conns[i]).unwrap();
            if n > 200 {
                break i;
            }
        }
        assert!(Instant::now() < deadline, "the sink never wrote: {}", consumer.said());
        std::thread::sleep(Duration::from_millis(100));
    };
    let to = (from + 1) % conns.len();
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("IMPORTING").arg(&ids[from]).query(&mut conns[to]).unwrap();
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("MIGRATING").arg(&ids[to]).query(&mut conns[from]).unwrap();
    let mut moved = 0;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(50).query(&mut conns[from]).unwrap();
        if keys.is_empty() {
            break;
        }
        moved += keys.len();
        let _: () = redis::cmd("MIGRATE").arg("127.0.0.1").arg(&ports[to]).arg("").arg(0).arg(5000).arg("KEYS").arg(&keys).query(&mut conns[from]).unwrap();
        // Slowly, so that the sink's transactions meet a slot half moved.
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in conns.iter_mut() {
        let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("NODE").arg(&ids[to]).query(c).unwrap();
    }
    eprintln!("moved slot {slot} ({moved} keys) from :{} to :{}", ports[from], ports[to]);
    assert!(producer.wait(COMMAND_LIMIT).status.success());
    assert!(live.producer("2500", after.to_str().unwrap()).wait(COMMAND_LIMIT).status.success());
    let cluster = env("TOOLRANK_TEST_VALKEY_CLUSTER_URL");
    live.await_sinks_equal_replay(&history, Some(&cluster), Duration::from_secs(180), || consumer.said());
    consumer.signal("-TERM");
    let out = consumer.wait(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // Its connection to the old owner was refused (MOVED, ASK, or a transaction the half-moved
    // slot aborted, depending on the moment) and it went on from the new owner.
    assert!(said.contains("valkey sink write failed"), "{said}");
    assert_eq!(owner(&mut conns), Some(to), "the keys stayed on the new owner");
    live.assert_sinks_equal_replay(&history, Some(&cluster));
}
