//! Memory of what a sink lease holder keeps, for a history split over 8 partitions (by
//! the PK, as Kafka's key does): one partition's whole engine, the copies of every
//! partition's aggregates (`AggregateCopy`, read from their snapshots), and the merged
//! sum the sinks are written from. Counted by a global allocator that adds up live bytes.
//!
//!   toolrank generate --sessions 300000 --seed 42 --out history.jsonl
//!   cargo run --release -p toolrank-engine --example copy-size -- history.jsonl

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use toolrank_engine::{AggregateCopy, Engine};
use toolrank_events::decode_line;

const PARTITIONS: u64 = 8;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib_since(before: isize) -> f64 {
    (LIVE.load(Ordering::Relaxed) - before) as f64 / (1 << 20) as f64
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: copy-size HISTORY.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut engines: Vec<Engine> = (0..PARTITIONS).map(|_| Engine::new()).collect();
    for line in text.lines() {
        // Bad lines are the decoder's business, not this measurement's.
        let _ = decode_line(line.as_bytes(), &mut |rec| {
            if let Ok(change) = rec.result {
                let hash = change.pk.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                engines[(hash % PARTITIONS) as usize].apply(&change);
            }
        });
    }
    drop(text);
    let snapshots: Vec<Vec<u8>> = engines.iter_mut().map(Engine::snapshot).collect();
    drop(engines);
    let before = LIVE.load(Ordering::Relaxed);
    let restored = Engine::restore(&snapshots[0]).expect("restores");
    println!("one partition's engine (restored): {:.1} MiB", mib_since(before));
    drop(restored);
    let before = LIVE.load(Ordering::Relaxed);
    let mut copies: Vec<AggregateCopy> = snapshots.iter().map(|s| AggregateCopy::from_log(s, &[], None).expect("loads")).collect();
    println!("copies of the {PARTITIONS} partitions' aggregates: {:.1} MiB", mib_since(before));
    let before = LIVE.load(Ordering::Relaxed);
    let mut merged = Engine::new();
    for c in &mut copies {
        merged.absorb_copy(c);
    }
    println!("their merged sum: {:.1} MiB", mib_since(before));
}
