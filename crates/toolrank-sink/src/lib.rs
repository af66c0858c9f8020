//! What the runtime asks of a sink, so that it writes any sink the binary wires in
//! (`sinks/dynamodb`, `sinks/valkey`) without knowing which.
//!
//! A write is *planned* on the consumer's thread, from the merged figures and the keys
//! that changed since the sink's last write, then *sent* on a worker thread while the
//! consumer reads on; the runtime collects the outcome at a later turn. Sinks hold
//! absolute values (counts, dates, rank keys), so a write repeated after a failure
//! converges instead of double counting. A sink remembers what it wrote, to send only
//! what differs; when another writer may have written since (the sink lease changed
//! hands, a write was cut off), the runtime *fences* that memory off and the next write
//! compares with what the sink holds.

use std::any::Any;
use std::cell::OnceCell;
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::Duration;
use toolrank_engine::{Changes, Cuts, Engine, ShardScores};
use toolrank_events::Day;

/// 128 bits of two independently keyed hashes of a value: what a sink keeps of what it
/// wrote (an item's content, a key's name) to tell later whether it must write or keep
/// it, at a fraction of the memory of the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

/// The keys of the hashes [`Fingerprint`]s are taken with, drawn once per sink.
pub struct Fingerprints(RandomState, RandomState);

impl Fingerprints {
    pub fn new() -> Fingerprints {
        Fingerprints(RandomState::new(), RandomState::new())
    }

    pub fn of<T: Hash + ?Sized>(&self, value: &T) -> Fingerprint {
        Fingerprint(u128::from(self.0.hash_one(value)) << 64 | u128::from(self.1.hash_one(value)))
    }
}

impl Default for Fingerprints {
    fn default() -> Fingerprints {
        Fingerprints::new()
    }
}

/// The longest a send may take: a stalled request is cut off and its sink compares with
/// what it holds at its next write.
pub const SEND_DEADLINE: Duration = Duration::from_secs(40);

/// A failed plan or send (retried at a later write).
#[derive(Debug, thiserror::Error)]
#[error("{sink} sink: {message}")]
pub struct Error {
    pub sink: &'static str,
    pub message: String,
    /// The sink refused the write: a writer with a newer fencing token wrote since.
    pub fenced: bool,
}

impl Error {
    pub fn new(sink: &'static str, error: impl std::fmt::Display) -> Error {
        Error { sink, message: error.to_string(), fenced: false }
    }

    /// A write the sink refused for its stale fencing token.
    pub fn fenced(sink: &'static str, error: impl std::fmt::Display) -> Error {
        Error { fenced: true, ..Error::new(sink, error) }
    }
}

/// What a sink's writes cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Requests (DynamoDB) or commands (Valkey) sent.
    pub requests: u64,
    /// Write capacity units the service reported consumed, where it reports them.
    pub write_units: f64,
}

/// When a sink writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// At every flush; while a backlog is read, its changes coalesce for a tenth of the
    /// backlog's age (at most a second). For a sink whose writes are cheap (Valkey).
    Live,
    /// Every `interval`, each key written at most once per interval: for a sink billed
    /// per write (DynamoDB).
    Paced {
        interval: Duration,
        /// While a backlog is read, writes wait as long as its records are late, up to
        /// this; also the longest a write waits for the budget. Zero: every interval.
        max_defer: Duration,
        /// A write waits (up to `max_defer`) until it writes at most this many items per
        /// event read since the last one. `None`: every interval.
        writes_per_event: Option<f64>,
    },
}

/// What a write is planned for besides the figures and the changes.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The day scores are taken for.
    pub today: Day,
    /// The recommendation cuts over every sink shard's patterns, when the figures hold
    /// only some shards' (`None`: they hold every pattern, and give the cuts themselves).
    pub cuts: Option<Cuts>,
    /// The figures' pattern scores by shard ([`Engine::scores_by_shard`] at `today` and
    /// `cuts`), shared by the sinks of every shard planned from the same figures: scored
    /// once, by the first that needs them, not once per shard.
    pub scores: Option<&'a OnceCell<ShardScores>>,
}

impl Scope<'_> {
    /// A scope of its own: the figures hold every pattern.
    pub fn of(today: Day) -> Scope<'static> {
        Scope { today, cuts: None, scores: None }
    }
}

/// A place the rankings are written.
pub trait Sink: Send + 'static {
    /// What one write sends, taken from the figures so that sending needs no engine.
    type Request: Send + 'static;

    /// The sink's name in logs and metrics.
    fn name(&self) -> &'static str;

    /// Plans the write that brings the sink to `figures` for the keys in `changes`, or for
    /// everything (of its shard) when it does not know what it holds, for `scope`.
    fn plan(&mut self, figures: &Engine, changes: &Changes, scope: Scope<'_>) -> Result<Self::Request, Error>;

    /// How many items `request` writes, when the sink knows what it holds (a write budget
    /// weighs it); `None` otherwise.
    fn size(&self, _request: &Self::Request) -> Option<usize> {
        None
    }

    /// Sends a planned write; blocks, within [`SEND_DEADLINE`]. What failed is written
    /// again at the next write ([`pending`](Self::pending)).
    fn send(&mut self, request: Self::Request) -> Result<(), Error>;

    /// Whether a write is due without new changes: the sink does not know what it holds,
    /// or has failed writes to redo.
    fn pending(&self) -> bool;

    /// Forgets what this writer believes the sink holds: another writer may have written
    /// since. The next write compares with the sink.
    fn fence(&mut self);

    /// Makes every write from now on carry the sink lease's fencing token `generation`.
    /// The sink keeps the largest token it was written with and refuses a write that
    /// carries a smaller one (a deposed holder's late write, [`Error::fenced`]); a writer
    /// with a new token records it there before it reads what the sink holds. Writers
    /// without a lease (a replay, a backfill) never call it and write unconditionally.
    fn hold(&mut self, generation: u64);

    fn stats(&self) -> Stats;
}

/// A [`Sink`] whose request type is erased, so that the runtime holds sinks of every kind.
pub trait AnySink: Send {
    fn name(&self) -> &'static str;
    fn plan(&mut self, figures: &Engine, changes: &Changes, scope: Scope<'_>) -> Result<Box<dyn Any + Send>, Error>;
    fn size(&self, request: &(dyn Any + Send)) -> Option<usize>;
    fn send(&mut self, request: Box<dyn Any + Send>) -> Result<(), Error>;
    fn pending(&self) -> bool;
    fn fence(&mut self);
    fn hold(&mut self, generation: u64);
    fn stats(&self) -> Stats;
}

impl<S: Sink> AnySink for S {
    fn name(&self) -> &'static str {
        Sink::name(self)
    }

    fn plan(&mut self, figures: &Engine, changes: &Changes, scope: Scope<'_>) -> Result<Box<dyn Any + Send>, Error> {
        Ok(Box::new(Sink::plan(self, figures, changes, scope)?))
    }

    fn size(&self, request: &(dyn Any + Send)) -> Option<usize> {
        request.downcast_ref::<S::Request>().and_then(|r| Sink::size(self, r))
    }

    fn send(&mut self, request: Box<dyn Any + Send>) -> Result<(), Error> {
        let request = request.downcast::<S::Request>().map_err(|_| Error::new(Sink::name(self), "a request planned by another sink"))?;
        Sink::send(self, *request)
    }

    fn pending(&self) -> bool {
        Sink::pending(self)
    }

    fn fence(&mut self) {
        Sink::fence(self)
    }

    fn hold(&mut self, generation: u64) {
        Sink::hold(self, generation)
    }

    fn stats(&self) -> Stats {
        Sink::stats(self)
    }
}

/// A sink as the runtime holds it, with its pace.
pub struct Wired {
    pub sink: Box<dyn AnySink>,
    pub pace: Pace,
}

impl Wired {
    pub fn new(sink: impl Sink, pace: Pace) -> Wired {
        Wired { sink: Box::new(sink), pace }
    }
}
