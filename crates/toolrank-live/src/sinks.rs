//! The sink scheduler: which wired sink writes when, from the merged engine.
//!
//! Each sink has a slot: the changes not yet written to it, its pace, and the write in
//! flight. A write is planned on the consumer's thread (it reads the merged engine) and
//! sent on the runtime's blocking threads while the consumer reads on; one write per sink
//! is in flight at a time, collected at a later flush. A paced sink (DynamoDB) also keeps
//! to its write budget: a round waits while it would write more items per event read
//! than the budget allows, up to its longest deferral.

use crate::backlog::stretch;
use crate::clock::now_ms;
use crate::latency::Visibility;
use crate::summary::Summary;
use std::cell::OnceCell;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use toolrank_backoff::Backoff;
use toolrank_engine::{Changes, Cuts, Engine, PatternKey, ShardScores, Sym};
use toolrank_events::Day;
use toolrank_sink::{AnySink, Pace, Scope, Stats, Wired};
use tracing::{debug, warn};

/// Changes taken from the merged engine and not yet written to a sink.
#[derive(Default)]
struct ChangeSet {
    agents: HashSet<Sym>,
    patterns: HashSet<PatternKey>,
}

impl ChangeSet {
    fn add(&mut self, c: &Changes) {
        self.agents.extend(&c.agents);
        self.patterns.extend(&c.patterns);
    }

    fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.patterns.is_empty()
    }

    fn len(&self) -> usize {
        self.agents.len() + self.patterns.len()
    }

    fn take(&mut self) -> Changes {
        self.take_at_most(usize::MAX)
    }

    /// Every changed agent and at most `patterns` changed patterns; the other patterns
    /// stay for a later write.
    fn take_at_most(&mut self, patterns: usize) -> Changes {
        let mut agents: Vec<Sym> = self.agents.drain().collect();
        let mut taken: Vec<PatternKey> = match self.patterns.len() <= patterns {
            true => self.patterns.drain().collect(),
            false => {
                let taken: Vec<PatternKey> = self.patterns.iter().take(patterns).copied().collect();
                for k in &taken {
                    self.patterns.remove(k);
                }
                taken
            }
        };
        agents.sort_unstable();
        taken.sort_unstable();
        Changes { agents, patterns: taken }
    }
}

/// The most changed patterns one write of a live sink carries. A larger change (a
/// catch-up's coalesced interval, another consumer's new base, a sink back from an
/// outage) goes out in several writes, one per flush and each as soon as the last one
/// returned, so that a transaction and the memory it is encoded in stay bounded whatever
/// the rankings' size (Valkey reuses that memory from one write to the next). A sink
/// that does not know what it holds rewrites everything in one write regardless.
const LIVE_WRITE_PATTERNS: usize = 16_384;

/// What a sink write returns: the sink, the outcome, and when it ended (ms since the
/// epoch: its records were visible from then, however late the loop collects it).
type Written = (Box<dyn AnySink>, Result<(), toolrank_sink::Error>, i64);

/// A sink write running beside the consumer.
struct Writing {
    task: tokio::task::JoinHandle<Written>,
    /// How many of the records not yet visible it covers.
    unseen: usize,
    /// When it started (ms since the epoch).
    started: i64,
}

/// One wired sink and its schedule.
pub(crate) struct Slot {
    name: &'static str,
    pace: Pace,
    /// The sink while no write runs; the running write has it.
    sink: Option<Box<dyn AnySink>>,
    writing: Option<Writing>,
    /// The sink must forget what it wrote once its running write returns.
    fence_on_return: bool,
    /// The fencing token the sink takes once its running write returns.
    token_on_return: Option<u64>,
    changes: ChangeSet,
    /// Its last write left changes for the next one ([`LIVE_WRITE_PATTERNS`]): that one
    /// is due at once.
    carry: bool,
    /// The recommendation cuts moved (other sink shards' patterns did): a write is due
    /// at its interval without changes of its own.
    recut: bool,
    /// When its last round started.
    last: Instant,
    /// Events read when the last round started; when a round last waited for the write
    /// budget, and how long until it checks again (doubling: each check costs what
    /// planning a round costs).
    events_at_last: u64,
    budget_waited: Instant,
    budget_wait: Duration,
    /// Items written per changed key in the last round planned: what a round of the keys
    /// changed since would write, estimated without planning it (a plan ranks every
    /// pattern and takes tens of milliseconds on a large state).
    writes_per_change: f64,
    rounds: u64,
    /// Milliseconds the loop spent planning its writes and waiting for them.
    blocked_ms: u64,
    stats: Stats,
    /// After a failed write, the next is not tried before `retry_at` (jittered, growing
    /// while the sink stays down), so that an outage costs few attempts and log lines.
    backoff: Backoff,
    retry_at: Instant,
}

impl Slot {
    pub(crate) fn new(wired: Wired) -> Slot {
        Slot {
            name: wired.sink.name(),
            pace: wired.pace,
            sink: Some(wired.sink),
            writing: None,
            fence_on_return: false,
            token_on_return: None,
            changes: ChangeSet::default(),
            carry: false,
            recut: false,
            last: Instant::now(),
            events_at_last: 0,
            budget_waited: Instant::now(),
            budget_wait: Duration::ZERO,
            writes_per_change: 1.0,
            rounds: 0,
            blocked_ms: 0,
            stats: Stats::default(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            retry_at: Instant::now(),
        }
    }
}

/// What the writer lends the scheduler for one flush.
pub(crate) struct Turn<'a> {
    /// The merged engine the writes are planned from.
    pub global: &'a Engine,
    /// Where the writes run.
    pub rt: &'a tokio::runtime::Runtime,
    pub today: Day,
    /// The recommendation cuts over every sink shard, when the merged view holds only
    /// some shards' patterns.
    pub cuts: Option<Cuts>,
    /// The merged view's pattern scores, taken by the first sink of this flush that needs
    /// them and shared by every shard's ([`Scope::scores`]).
    pub scores: &'a OnceCell<ShardScores>,
    /// How far behind the records being read are, if a backlog is read.
    pub backlog: Option<Duration>,
    /// The events the merged state covers so far.
    pub events: u64,
    pub visibility: &'a mut Visibility,
    /// Failed plans and writes, counted (all are retried).
    pub retried: &'a mut u64,
}

/// The wired sinks, each with its slot, in the order they are written.
pub(crate) struct Scheduler {
    slots: Vec<Slot>,
    /// The sink whose writes make records visible (the first live one: the latency is
    /// measured there).
    visible: usize,
}

impl Scheduler {
    pub(crate) fn new(sinks: Vec<Wired>) -> Scheduler {
        let visible = sinks.iter().position(|w| w.pace == Pace::Live).unwrap_or(0);
        Scheduler { slots: sinks.into_iter().map(Slot::new).collect(), visible }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether no sink would write at a flush now, so that the units' changes may keep
    /// coalescing where they are (only with a live sink: the others forward at every flush).
    pub(crate) fn resting(&self, backlog: Option<Duration>) -> bool {
        self.slots.iter().any(|s| s.pace == Pace::Live) && self.slots.iter().all(|s| !s.carry && s.last.elapsed() < interval(s.pace, backlog))
    }

    /// Adds `changes` to every sink's and writes each that is due (every one with `now`).
    /// `false` when a plan or a collected write failed (it is retried).
    pub(crate) fn write(&mut self, changes: &Changes, now: bool, turn: &mut Turn<'_>) -> bool {
        let mut ok = true;
        for i in 0..self.slots.len() {
            self.slots[i].changes.add(changes);
            ok &= self.write_one(i, now, turn);
        }
        let visible = self.slots.get(self.visible).filter(|s| s.pace == Pace::Live);
        if visible.is_some_and(|s| s.sink.as_ref().is_some_and(|sink| !sink.pending()) && s.changes.is_empty()) {
            // Nothing is waiting to be written or being written: what the records read so
            // far did to the rankings (often nothing: a repeated Agent item, a stale copy)
            // is visible.
            turn.visibility.visible(turn.visibility.waiting(), now_ms());
        }
        ok
    }

    /// Collects sink `i`'s finished write (waits for it with `now`), then starts the next
    /// one when it is due.
    fn write_one(&mut self, i: usize, now: bool, turn: &mut Turn<'_>) -> bool {
        let mut ok = self.collect(i, now, turn.rt, turn.visibility, turn.retried);
        let slot = &mut self.slots[i];
        // Bounded by the rankings' keys, however long the sink is down.
        toolrank_metrics::gauge!("toolrank_sink_pending_keys", "sink" => slot.name).set(slot.changes.len() as f64);
        let interval = interval(slot.pace, turn.backlog);
        let since = slot.last.elapsed();
        let due = match slot.pace {
            _ if !now && Instant::now() < slot.retry_at => false,
            Pace::Live => now || slot.carry || since >= interval,
            Pace::Paced { max_defer, .. } => now || (since >= interval && (slot.budget_waited.elapsed() >= slot.budget_wait || since >= max_defer)),
        };
        let Some(mut sink) = slot.sink.take_if(|s| due && (!slot.changes.is_empty() || slot.recut || s.pending())) else {
            return ok;
        };
        // A sink that does not know what it holds, or has failed writes to redo (planning
        // takes those in), writes now.
        let unknown = sink.pending();
        if !now && !unknown && over_budget(slot, turn.events, slot.writes_per_change * slot.changes.len() as f64) {
            // Not planned: another interval's events first.
            slot.sink = Some(sink);
            return ok;
        }
        let started = Instant::now();
        let changes = match slot.pace {
            Pace::Live if !now && !unknown => slot.changes.take_at_most(LIVE_WRITE_PATTERNS),
            _ => slot.changes.take(),
        };
        slot.carry = slot.pace == Pace::Live && !slot.changes.is_empty();
        let request = match sink.plan(turn.global, &changes, Scope { today: turn.today, cuts: turn.cuts, scores: Some(turn.scores) }) {
            Ok(request) => request,
            Err(e) => {
                // The sink stays pending: its next write compares in full.
                slot.sink = Some(sink);
                slot.retry_at = Instant::now() + slot.backoff.next_delay();
                slot.blocked_ms += started.elapsed().as_millis() as u64;
                warn!(error = %e, "{} sink write failed while planning; retrying at the next flush", slot.name);
                *turn.retried += 1;
                return false;
            }
        };
        if let Pace::Paced { .. } = slot.pace {
            let writes = sink.size(&*request).filter(|_| !unknown);
            if let Some(w) = writes.filter(|_| !changes.is_empty()) {
                slot.writes_per_change = w as f64 / changes.len() as f64;
            }
            // Unknown (a first write, a retry): written now.
            if !now && writes.is_some_and(|w| over_budget(slot, turn.events, w as f64)) {
                // The changes wait for a later round; the plan was work for nothing.
                toolrank_metrics::counter!("toolrank_sink_plans_held_total", "sink" => slot.name).increment(1);
                debug!(items = writes, changes = changes.len(), "{} sink round planned and held back by the write budget", slot.name);
                slot.changes.add(&changes);
                slot.sink = Some(sink);
                slot.budget_waited = Instant::now();
                slot.budget_wait = (slot.budget_wait * 2).max(interval);
                slot.blocked_ms += started.elapsed().as_millis() as u64;
                return ok;
            }
            slot.events_at_last = turn.events;
            slot.budget_wait = Duration::ZERO;
        }
        slot.last = started;
        slot.recut = false;
        slot.rounds += 1;
        let task = turn.rt.spawn_blocking(move || {
            let result = sink.send(request);
            (sink, result, now_ms())
        });
        // Records become visible with the write that carries the last of their changes.
        let unseen = if slot.carry { 0 } else { turn.visibility.waiting() };
        slot.writing = Some(Writing { task, unseen, started: now_ms() });
        slot.blocked_ms += started.elapsed().as_millis() as u64;
        if now {
            ok &= self.collect(i, true, turn.rt, turn.visibility, turn.retried);
        }
        ok
    }

    /// Takes sink `i` back from its write if it finished (or, with `wait`, once it
    /// finishes). `false` if the write failed or left writes to redo.
    fn collect(&mut self, i: usize, wait: bool, rt: &tokio::runtime::Runtime, visibility: &mut Visibility, retried: &mut u64) -> bool {
        let slot = &mut self.slots[i];
        let Some(writing) = slot.writing.take_if(|w| wait || w.task.is_finished()) else {
            return true;
        };
        let started = Instant::now();
        let (mut sink, result, ended) = rt.block_on(writing.task).expect("a sink write does not panic");
        slot.blocked_ms += started.elapsed().as_millis() as u64;
        toolrank_metrics::histogram!("toolrank_sink_write_seconds", "sink" => slot.name).record((ended - writing.started).max(0) as f64 / 1000.0);
        let sent = match result {
            Ok(()) => true,
            Err(e) if e.fenced => {
                toolrank_metrics::counter!("toolrank_sink_fenced_writes_total", "sink" => slot.name).increment(1);
                warn!(error = %e, "{} sink refused a write of this writer: another one holds the sink lease", slot.name);
                false
            }
            Err(e) => {
                // What failed stays pending inside the sink.
                warn!(error = %e, "{} sink write failed; retrying at the next flush", slot.name);
                false
            }
        };
        if std::mem::take(&mut slot.fence_on_return) {
            sink.fence();
        }
        if let Some(generation) = slot.token_on_return.take() {
            sink.hold(generation);
        }
        slot.stats = sink.stats();
        if sent {
            slot.backoff.reset();
        } else {
            slot.retry_at = Instant::now() + slot.backoff.next_delay();
        }
        let ok = sent && !sink.pending();
        slot.sink = Some(sink);
        *retried += u64::from(!sent);
        if sent && i == self.visible {
            visibility.visible(writing.unseen, ended);
        }
        ok
    }

    /// Waits for every sink's running write; `false` if one failed.
    pub(crate) fn collect_all(&mut self, rt: &tokio::runtime::Runtime, visibility: &mut Visibility, retried: &mut u64) -> bool {
        (0..self.slots.len()).fold(true, |ok, i| self.collect(i, true, rt, visibility, retried) & ok)
    }

    /// Makes every sink forget what it wrote (now, or when its running write returns):
    /// another writer may have written since this one last held the lease.
    pub(crate) fn fence(&mut self) {
        for slot in &mut self.slots {
            match &mut slot.sink {
                Some(sink) => sink.fence(),
                None => slot.fence_on_return = true,
            }
        }
    }

    /// Makes every paced sink (the one that applies the cuts) write at its next turn,
    /// changes or not: the recommendation cuts moved.
    pub(crate) fn recut(&mut self) {
        self.slots.iter_mut().filter(|s| s.pace != Pace::Live).for_each(|s| s.recut = true);
    }

    /// Gives every sink the sink lease's fencing token for its writes from now on (now,
    /// or when its running write returns).
    pub(crate) fn hold(&mut self, generation: u64) {
        for slot in &mut self.slots {
            match &mut slot.sink {
                Some(sink) => sink.hold(generation),
                None => slot.token_on_return = Some(generation),
            }
        }
    }

    /// Adds the sinks' figures to `summary`.
    pub(crate) fn add_to(&self, summary: &mut Summary) {
        for slot in &self.slots {
            match slot.name {
                "dynamodb" => {
                    summary.dynamodb_requests += slot.stats.requests;
                    summary.dynamodb_write_units += slot.stats.write_units;
                    summary.dynamodb_rounds += slot.rounds;
                    summary.dynamodb_ms += slot.blocked_ms;
                }
                _ => {
                    summary.valkey_commands += slot.stats.requests;
                    summary.valkey_ms += slot.blocked_ms;
                }
            }
        }
    }
}

/// How long a sink's changes coalesce now. A live sink: not at all, or while a backlog
/// more than a second old is read, a tenth of its age (at most a second): a view that is
/// behind anyway gets at most 10% staler, for far fewer commands. A paced one: its
/// interval, stretched by a backlog ([`stretch`]).
fn interval(pace: Pace, backlog: Option<Duration>) -> Duration {
    match (pace, backlog) {
        (Pace::Live, Some(behind)) if behind >= Duration::from_secs(1) => (behind / 10).min(Duration::from_secs(1)),
        (Pace::Live, _) => Duration::ZERO,
        (Pace::Paced { interval, max_defer, .. }, backlog) => stretch(interval, max_defer, backlog),
    }
}

/// Whether a round of `writes` items writes more per event read since the slot's last
/// round than its write budget allows, and the round may still wait for that.
fn over_budget(slot: &Slot, events: u64, writes: f64) -> bool {
    let Pace::Paced { max_defer, writes_per_event: Some(budget), .. } = slot.pace else { return false };
    slot.last.elapsed() < max_defer && writes > budget * events.saturating_sub(slot.events_at_last) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use toolrank_sink::{Error, Sink};

    /// Records how many changed patterns each write it was sent carried.
    struct Recording(Arc<Mutex<Vec<usize>>>);

    impl Sink for Recording {
        type Request = usize;
        fn name(&self) -> &'static str {
            "recording"
        }
        fn plan(&mut self, _: &Engine, changes: &Changes, _: Scope<'_>) -> Result<usize, Error> {
            Ok(changes.patterns.len())
        }
        fn send(&mut self, patterns: usize) -> Result<(), Error> {
            self.0.lock().unwrap().push(patterns);
            Ok(())
        }
        fn pending(&self) -> bool {
            false
        }
        fn fence(&mut self) {}
        fn hold(&mut self, _: u64) {}
        fn stats(&self) -> Stats {
            Stats::default()
        }
    }

    fn patterns(n: u32) -> Changes {
        Changes { agents: vec![1], patterns: (0..n).map(|user| PatternKey { user, agent: 1, sequence: 2 }).collect() }
    }

    #[test]
    fn a_large_change_goes_to_a_live_sink_in_bounded_writes_each_due_once_the_last_returned() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut scheduler = Scheduler::new(vec![Wired::new(Recording(written.clone()), Pace::Live)]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (engine, mut visibility, mut retried, scores) = (Engine::new(), Visibility::new(), 0, OnceCell::new());
        let mut turn = Turn {
            global: &engine,
            rt: &rt,
            today: Day(20_000),
            cuts: None,
            scores: &scores,
            backlog: None,
            events: 0,
            visibility: &mut visibility,
            retried: &mut retried,
        };
        let total = 2 * LIVE_WRITE_PATTERNS as u32 + 100;
        assert!(scheduler.write(&patterns(total), false, &mut turn));
        // From now on a backlog ten seconds old: a write waits a second after the last
        // one, unless it carries what the last one left.
        turn.backlog = Some(Duration::from_secs(10));
        for _ in 0..2 {
            // Once the last write returned, the next flush starts the next one at once.
            while !scheduler.slots[0].writing.as_ref().unwrap().task.is_finished() {
                std::thread::yield_now();
            }
            assert!(!scheduler.resting(turn.backlog), "changes left over are due");
            assert!(scheduler.write(&Changes::default(), false, &mut turn));
            assert!(scheduler.slots[0].writing.is_some());
        }
        assert!(scheduler.collect_all(&rt, turn.visibility, turn.retried));
        assert_eq!(*written.lock().unwrap(), [LIVE_WRITE_PATTERNS, LIVE_WRITE_PATTERNS, 100]);
        assert!(!scheduler.slots[0].carry && scheduler.slots[0].changes.is_empty());
        // Nothing left over: the sink rests until its interval is up.
        assert!(scheduler.resting(turn.backlog));

        // The exit's write (`now`) carries everything at once.
        assert!(scheduler.write(&patterns(total), true, &mut turn));
        assert_eq!(written.lock().unwrap().last(), Some(&(total as usize)));
    }
}
