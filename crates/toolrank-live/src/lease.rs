//! The sink lease: one writer of a group writes the sinks. A holder renews beside the
//! loop (a slow state table must not hold up reading): it sends a renewal and collects
//! it at a later turn, and waits for it only once the last renewal is half a lease old.

use crate::deadline::within;
use std::time::{Duration, Instant};
use toolrank_state::{Lease, Taken};
use tracing::warn;

/// A renewal of the lease: what [`Lease::take`] returns.
type Renewal = tokio::task::JoinHandle<Result<Option<Taken>, toolrank_dynamodb::Error>>;

/// What a turn did to the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Held, and nobody else wrote the sinks since this writer last held it.
    Still,
    /// Just taken after another writer held it: what the sinks hold is unknown.
    Taken,
    /// Just lost.
    Lost,
    /// Not held.
    No,
}

pub(crate) struct SinkLease {
    lease: Lease,
    duration: Duration,
    held: bool,
    /// The fencing token of the lease as last taken or renewed: the sinks refuse writes
    /// carrying an older one.
    generation: Option<u64>,
    /// When the lease was last renewed (when that renewal was sent).
    renewed: Instant,
    /// A renewal running beside the loop, and when it was sent.
    renewal: Option<(Instant, Renewal)>,
}

impl SinkLease {
    pub(crate) fn new(lease: Lease, duration: Duration) -> SinkLease {
        SinkLease { lease, duration, held: false, generation: None, renewed: Instant::now(), renewal: None }
    }

    pub(crate) fn held(&self) -> bool {
        self.held
    }

    /// The fencing token of the lease as this writer last held it.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Takes or renews the lease. A failed call counts in `retried`; then the lease is
    /// kept only while the last renewal surely still holds.
    pub(crate) fn turn(&mut self, rt: &tokio::runtime::Runtime, retried: &mut u64) -> Held {
        let Some((sent, taken)) = self.outcome(rt) else {
            // A renewal is on its way and the last one still holds.
            return if self.held { Held::Still } else { Held::No };
        };
        // Whether this writer's record of what the sinks hold is still exact: nobody else
        // wrote them since it last held the lease.
        let mut continued = true;
        let held = match taken {
            Ok(taken) => {
                self.renewed = sent;
                continued = taken.is_some_and(|t| t.continued);
                if let Some(t) = taken {
                    self.generation = Some(t.generation);
                }
                taken.is_some()
            }
            Err(e) => {
                *retried += 1;
                warn!(error = %e, "renewing the sink lease failed");
                self.held && self.renewed.elapsed() < self.duration / 2
            }
        };
        let was = self.set_held(held);
        match (was, held) {
            (false, true) if !continued => Held::Taken,
            (_, true) => Held::Still,
            (true, false) => Held::Lost,
            (false, false) => Held::No,
        }
    }

    /// The outcome of a take or renewal, with when it was sent; `None` while a renewal
    /// runs and need not be waited for.
    fn outcome(&mut self, rt: &tokio::runtime::Runtime) -> Option<(Instant, Result<Option<Taken>, toolrank_dynamodb::Error>)> {
        let held = self.generation.filter(|_| self.held);
        if held.is_none() {
            self.settle(rt);
            return Some((Instant::now(), within(rt, "taking the sink lease", self.lease.take(None))));
        }
        let due = self.renewed.elapsed() >= self.duration / 2;
        if let Some((sent, task)) = self.renewal.take_if(|(_, task)| due || task.is_finished()) {
            let renewed = join(rt, task);
            if let Ok(Some(taken)) = renewed {
                // The next one goes out now: a renewal is always on its way, so a slow
                // state table has the whole lease to answer before it lapses.
                self.send_renewal(rt, taken.generation);
            }
            return Some((sent, renewed));
        }
        if due {
            return Some((Instant::now(), within(rt, "renewing the sink lease", self.lease.take(held))));
        }
        if let (None, Some(generation)) = (&self.renewal, held) {
            self.send_renewal(rt, generation);
        }
        None
    }

    /// Sends a renewal of the lease held at `generation` beside the loop.
    fn send_renewal(&mut self, rt: &tokio::runtime::Runtime, generation: u64) {
        let lease = self.lease.clone();
        self.renewal = Some((Instant::now(), rt.spawn(async move { lease.take(Some(generation)).await })));
    }

    /// Waits for a renewal still running (before the lease is released or taken anew: a
    /// late renewal must not take it back).
    fn settle(&mut self, rt: &tokio::runtime::Runtime) {
        if let Some((_, task)) = self.renewal.take() {
            // Its outcome no longer matters: the caller takes or releases the lease anew.
            let _ = join(rt, task);
        }
    }

    /// Gives the lease up (it lapses by itself if that fails).
    pub(crate) fn release(&mut self, rt: &tokio::runtime::Runtime) {
        self.settle(rt);
        if let Err(e) = within(rt, "releasing the sink lease", self.lease.release()) {
            warn!(error = %e, "could not release the sink lease; it lapses by itself");
        }
        self.set_held(false);
    }

    /// Records whether the lease is held, in `toolrank_sink_lease_held` too; what it was.
    fn set_held(&mut self, held: bool) -> bool {
        toolrank_metrics::gauge!("toolrank_sink_lease_held").set(if held { 1.0 } else { 0.0 });
        std::mem::replace(&mut self.held, held)
    }

    /// When any writer last gave the lease up after writing (ms since the epoch, 0 if never).
    pub(crate) fn last_released(&self, rt: &tokio::runtime::Runtime) -> Result<u64, toolrank_dynamodb::Error> {
        within(rt, "reading the sink lease", self.lease.last_released())
    }

    /// Write requests sent for the lease, and the units they consumed.
    pub(crate) fn writes(&self) -> (u64, f64) {
        (self.lease.write_requests(), self.lease.write_units())
    }
}

/// A renewal's outcome, waited for up to the call deadline; one still running then is
/// aborted (a late one must not renew a lease given up meanwhile).
fn join(rt: &tokio::runtime::Runtime, mut task: Renewal) -> Result<Option<Taken>, toolrank_dynamodb::Error> {
    let joined = within(rt, "renewing the sink lease", async { (&mut task).await.expect("a lease renewal does not panic") });
    task.abort();
    joined
}
