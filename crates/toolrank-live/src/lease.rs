//! The sink lease: one writer of a group writes the sinks. A holder renews beside the
//! loop (a slow state table must not hold up reading, and a loop held up by a slow read,
//! such as another consumer's checkpoint, must not lose the lease): a task renews it every
//! third of a lease while the loop goes on, and the loop collects what it learnt at its
//! turns, waiting for it only once the last renewal is half a lease old.

use crate::deadline::{within, CALL_DEADLINE};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use toolrank_state::{Lease, Taken};
use tracing::warn;

/// What a renewal returned, with when it was sent.
type Outcome = (Instant, Result<Option<Taken>, toolrank_dynamodb::Error>);

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
    /// The renewals running beside the loop while the lease is held.
    renewer: Option<Renewer>,
}

/// A task renewing the lease every third of a lease until a renewal fails or is refused,
/// it is stopped, or the loop has not turned for [`stalled`]: a loop stuck that long
/// gives the lease up to another consumer.
struct Renewer {
    outcomes: tokio::sync::mpsc::UnboundedReceiver<Outcome>,
    /// When the loop last turned.
    turned: Arc<Mutex<Instant>>,
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// How long the loop may go without a turn before the renewals stop: past the longest
/// call it can wait for, and a lease more.
fn stalled(duration: Duration) -> Duration {
    CALL_DEADLINE + duration
}

impl Renewer {
    fn start(rt: &tokio::runtime::Runtime, lease: Lease, generation: u64, duration: Duration) -> Renewer {
        let (sender, outcomes) = tokio::sync::mpsc::unbounded_channel();
        let turned = Arc::new(Mutex::new(Instant::now()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let (last_turn, stopped) = (turned.clone(), stop.clone());
        let task = rt.spawn(async move {
            // Every third of a lease from when the last renewal was sent, not from its
            // reply: a slow reply delays the next renewal no further than that.
            let mut due = Instant::now() + duration / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = stopped.notified() => return,
                }
                if last_turn.lock().expect("not poisoned").elapsed() > stalled(duration) {
                    warn!("the loop has not turned for {} s: the sink lease is left to lapse", stalled(duration).as_secs());
                    return;
                }
                let sent = Instant::now();
                due = sent + duration / 3;
                let renewed = lease.take(Some(generation)).await;
                let go_on = matches!(renewed, Ok(Some(_)));
                if sender.send((sent, renewed)).is_err() || !go_on {
                    return;
                }
            }
        });
        Renewer { outcomes, turned, stop, task }
    }

    /// The latest outcome not collected yet; with `wait`, waits for the next one if there
    /// is none (`None`: the task ended without one).
    fn latest(&mut self, rt: &tokio::runtime::Runtime, wait: bool) -> Option<Result<Outcome, toolrank_dynamodb::Error>> {
        *self.turned.lock().expect("not poisoned") = Instant::now();
        let mut latest = None;
        while let Ok(outcome) = self.outcomes.try_recv() {
            latest = Some(outcome);
        }
        match latest {
            Some(outcome) => Some(Ok(outcome)),
            None if wait => {
                let next = within(rt, "renewing the sink lease", async { Ok::<_, toolrank_dynamodb::Error>(self.outcomes.recv().await) });
                next.transpose()
            }
            None => None,
        }
    }

    /// Stops the renewals and waits for one still running (before the lease is released
    /// or taken anew: a late renewal must not take it back).
    fn settle(mut self, rt: &tokio::runtime::Runtime) {
        self.stop.notify_one();
        // Its outcome no longer matters: the caller takes or releases the lease anew.
        let task = &mut self.task;
        let _ = within(rt, "renewing the sink lease", async { Ok::<_, toolrank_dynamodb::Error>(task.await) });
    }
}

impl Drop for Renewer {
    /// A writer dropped without giving the lease up lets it lapse.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SinkLease {
    pub(crate) fn new(lease: Lease, duration: Duration) -> SinkLease {
        SinkLease { lease, duration, held: false, generation: None, renewed: Instant::now(), renewer: None }
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
            // Renewals are on their way and the last one still holds.
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
        if let Some(generation) = self.generation.filter(|_| held && self.renewer.is_none()) {
            // Renewed from now on beside the loop, also while it waits for a long call.
            self.renewer = Some(Renewer::start(rt, self.lease.clone(), generation, self.duration));
        }
        match (was, held) {
            (false, true) if !continued => Held::Taken,
            (_, true) => Held::Still,
            (true, false) => Held::Lost,
            (false, false) => Held::No,
        }
    }

    /// The outcome of a take or renewal, with when it was sent; `None` while renewals run
    /// and need not be waited for.
    fn outcome(&mut self, rt: &tokio::runtime::Runtime) -> Option<Outcome> {
        let held = self.generation.filter(|_| self.held);
        if held.is_none() {
            self.settle(rt);
            return Some((Instant::now(), within(rt, "taking the sink lease", self.lease.take(None))));
        }
        let due = self.renewed.elapsed() >= self.duration / 2;
        match self.renewer.as_mut().and_then(|r| r.latest(rt, due)) {
            Some(Ok(outcome)) => {
                if !matches!(outcome.1, Ok(Some(_))) {
                    // The renewals stopped with it: the next turn starts them again.
                    self.settle(rt);
                }
                Some(outcome)
            }
            Some(Err(e)) => Some((Instant::now(), Err(e))),
            None if due => {
                // The renewals stopped (the loop stalled) or never started: renew here.
                self.settle(rt);
                Some((Instant::now(), within(rt, "renewing the sink lease", self.lease.take(held))))
            }
            None => None,
        }
    }

    /// Stops the renewals beside the loop, waiting for one still running.
    fn settle(&mut self, rt: &tokio::runtime::Runtime) {
        if let Some(renewer) = self.renewer.take() {
            renewer.settle(rt);
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

    /// Records whether the lease is held; what it was.
    fn set_held(&mut self, held: bool) -> bool {
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
