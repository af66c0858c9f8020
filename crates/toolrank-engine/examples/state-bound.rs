//! How big the engine state grows over a long stream whose items expire (the seed's TTL),
//! with and without a tombstone horizon. Simulated time: EVENTS_PER_SEC executions per
//! second; every session (3 executions) is removed by TTL after TTL_SECS; tombstones
//! expire HORIZON_SECS after their removal when a horizon is set. Prints the state every
//! REPORT_EVERY records: with a horizon it levels off at the live items plus a horizon's
//! removals, without one it grows with everything ever seen.
//!
//!   cargo run --release -p toolrank-engine --example state-bound [EVENTS]

use std::borrow::Cow;
use std::collections::VecDeque;
use toolrank_engine::Engine;
use toolrank_events::{Action, Change, Entity, Execution, Timestamp};

const EVENTS_PER_SEC: u64 = 5_000;
const TTL_SECS: u64 = 60;
const HORIZON_SECS: u32 = 30;
const REPORT_EVERY: u64 = 1_000_000;
const START: u32 = 1_750_000_000;

fn main() {
    let events: u64 = std::env::args().nth(1).map_or(6_000_000, |n| n.parse().expect("EVENTS is a number"));
    println!("{events} records (executions at {EVENTS_PER_SEC}/s simulated, sessions of 3, each removed by TTL after {TTL_SECS} s)");
    println!("| horizon | records | live executions | tombstones | sessions held | state MB |");
    println!("|---|---|---|---|---|---|");
    for horizon in [None, Some(HORIZON_SECS)] {
        run(events, horizon);
    }
}

fn run(events: u64, horizon: Option<u32>) {
    let mut engine = Engine::new();
    let at = Timestamp::parse("20250614090000").expect("valid");
    // Sessions still live, by the time their TTL removes them.
    let mut live: VecDeque<(u64, u64)> = VecDeque::new();
    let (mut records, mut seq, mut session) = (0u64, 0u128, 0u64);
    while records < events {
        // Executions arrive at EVENTS_PER_SEC; their TTL removals come on top.
        let now = session * 3 / EVENTS_PER_SEC;
        engine.set_clock(START + now as u32);
        let change = |pk: String, sk: String, seq: u128, action| Change { pk: Cow::Owned(pk), sk: Cow::Owned(sk), seq: Some(seq), action };
        session += 1;
        for p in 1..=3 {
            seq += 1;
            let put = Action::Put(Entity::Execution(Execution { tool_nm: Cow::Borrowed("SEARCH"), at, success: p != 3 || session % 5 != 0 }));
            engine.apply(&change(format!("USR{:05}#SESS{session:09}", session % 20_000), format!("PRC00{p}#AGT{:03}#TL001", session % 200), seq, put));
        }
        live.push_back((session, now + TTL_SECS));
        let mut removed = 0;
        while let Some(&(s, _)) = live.front().filter(|(_, due)| *due <= now) {
            live.pop_front();
            for p in 1..=3 {
                seq += 1;
                engine.apply(&change(
                    format!("USR{:05}#SESS{s:09}", s % 20_000),
                    format!("PRC00{p}#AGT{:03}#TL001", s % 200),
                    seq,
                    Action::Delete { ttl: true },
                ));
            }
            removed += 3;
        }
        let before = records;
        records += 3 + removed;
        if records / 1000 != before / 1000 {
            engine.flush();
            if let Some(h) = horizon {
                engine.expire_tombstones(h);
            }
        }
        if records / REPORT_EVERY != before / REPORT_EVERY || records >= events {
            engine.flush();
            let st = engine.stats();
            let label = horizon.map_or("none".to_owned(), |h| format!("{h} s"));
            println!("| {label} | {records} | {} | {} | {} | {:.1} |", st.live_rows, st.tombstones, st.sessions, st.heap_bytes as f64 / 1e6);
        }
    }
}
