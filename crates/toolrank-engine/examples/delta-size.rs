//! Bytes per record of the engine's deltas (what checkpoint appends and Lambda bucket
//! logs store), for a history applied in batches of 100, 1000 and 25,000 records, next to
//! the whole state's snapshot.
//!
//!   toolrank generate --sessions 20000 --seed 3 --out history.jsonl
//!   cargo run --release -p toolrank-engine --example delta-size -- history.jsonl

use toolrank_engine::Engine;
use toolrank_events::decode_line;

fn main() {
    let path = std::env::args().nth(1).expect("usage: delta-size HISTORY.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    for batch in [100, 1000, 25_000] {
        let mut engine = Engine::new();
        engine.track_deltas();
        let mut bytes = 0;
        for chunk in lines.chunks(batch) {
            for line in chunk {
                // Bad lines are the decoder's business, not this measurement's.
                let _ = decode_line(line.as_bytes(), &mut |rec| {
                    if let Ok(change) = rec.result {
                        engine.apply(&change);
                    }
                });
            }
            bytes += engine.delta(300_000).iter().map(Vec::len).sum::<usize>();
            engine.delta_saved();
        }
        let snapshot = engine.snapshot().len();
        println!(
            "batches of {batch}: {} records, {bytes} delta bytes, {:.1} bytes/record; snapshot {snapshot} bytes, {:.1} bytes/record",
            lines.len(),
            bytes as f64 / lines.len() as f64,
            snapshot as f64 / lines.len() as f64
        );
    }
}
