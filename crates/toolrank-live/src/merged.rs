//! The merged view the sink lease holder writes the sinks from: the sum of every unit's
//! engine, this consumer's own (forwarded as they change) and copies of the aggregates of
//! the units other consumers own (as of their latest checkpoints). Aggregates merge by
//! addition, so a unit moves in and out of the sum with `absorb` and `unabsorb`.

use crate::error::Error;
use std::collections::BTreeMap;
use toolrank_engine::{AggregateCopy, Changes, Engine, Shards};

/// A unit owned by another consumer, as of its latest checkpoint (lease holder only):
/// its aggregates, not its sessions.
struct Copy {
    figures: AggregateCopy,
    /// The log position it holds (the head it was read at).
    at: u64,
    /// It lacks the patterns of a shard taken since it was read: the next refresh reads
    /// it again from its base.
    stale: bool,
}

pub(crate) struct Merged {
    global: Engine,
    copies: BTreeMap<String, Copy>,
    /// How many sink shards the users are split into.
    count: u32,
}

impl Merged {
    /// A view keeping the patterns of `shards`.
    pub(crate) fn new(shards: Shards) -> Merged {
        let mut global = Engine::new();
        global.track_changes();
        let count = shards.count();
        global.keep_shards(shards);
        Merged { global, copies: BTreeMap::new(), count }
    }

    /// The shards whose patterns it keeps (`None`: all): a copy is read with them.
    pub(crate) fn shards(&self) -> Option<&Shards> {
        self.global.kept_shards()
    }

    /// Whether it keeps the patterns of `shard`.
    pub(crate) fn holds(&self, shard: u32) -> bool {
        self.shards().is_none_or(|s| s.holds(shard))
    }

    /// Keeps the patterns of `shard` too, adding those of the own `units` now; the
    /// copies are read again from their bases at the next refresh.
    pub(crate) fn take_shard(&mut self, shard: u32, units: &mut [&mut Engine]) {
        self.global.take_shard(shard, units);
        self.copies.values_mut().for_each(|c| c.stale = true);
    }

    /// Keeps the patterns of `shard` no more.
    pub(crate) fn give_up_shard(&mut self, shard: u32) {
        let count = self.count;
        self.global.give_up_shard(shard, count);
        self.copies.values_mut().for_each(|c| c.figures.give_up_shard(shard, count));
    }

    /// The figures the sinks are written from.
    pub(crate) fn figures(&self) -> &Engine {
        &self.global
    }

    /// What changed in the sum since the last call.
    pub(crate) fn take_changes(&mut self) -> Changes {
        self.global.take_changes()
    }

    /// Adds a unit this consumer now owns, in place of the copy of it held until now.
    pub(crate) fn adopt(&mut self, scope: &str, engine: &mut Engine) {
        self.drop_copy(scope);
        self.global.absorb(engine);
    }

    /// Forwards a unit's changes since the last forward.
    pub(crate) fn forward(&mut self, engine: &mut Engine) {
        engine.flush_into(&mut self.global);
    }

    /// Takes an owned unit's share out (it moved elsewhere). Its pending changes are
    /// forwarded first: the sum must hold exactly what is taken out.
    pub(crate) fn release(&mut self, engine: &mut Engine) {
        engine.flush_into(&mut self.global);
        self.global.unabsorb(engine);
    }

    /// The log position of the copy of `scope`, if one is held.
    pub(crate) fn copy_at(&self, scope: &str) -> Option<u64> {
        self.copies.get(scope).filter(|c| !c.stale).map(|c| c.at)
    }

    /// Holds `figures` at log position `at` as the copy of `scope`, in place of any older
    /// one: the sum moves by what differs between the two, so that the sinks rewrite
    /// only that.
    pub(crate) fn hold_copy(&mut self, scope: &str, mut figures: AggregateCopy, at: u64) {
        match self.copies.get_mut(scope) {
            Some(old) => self.global.replace_copy(&mut old.figures, &mut figures),
            None => self.global.absorb_copy(&mut figures),
        }
        self.copies.insert(scope.to_owned(), Copy { figures, at, stale: false });
    }

    /// Moves the copy of `scope` from log position `from` to `to` by `deltas`. A copy at
    /// another position is left as it is (the next refresh reads it); one that fails
    /// half way is dropped.
    pub(crate) fn advance_copy(&mut self, scope: &str, from: u64, to: u64, deltas: &[Vec<u8>]) -> Result<(), Error> {
        let Some(c) = self.copies.get_mut(scope).filter(|c| c.at == from && !c.stale) else { return Ok(()) };
        let applied = deltas
            .iter()
            .try_for_each(|d| c.figures.apply_delta(d, Some(&mut self.global)))
            .map_err(|source| Error::Snapshot { scope: scope.to_owned(), source });
        match applied {
            // Half applied: no longer a copy of any position.
            Err(_) => self.drop_copy(scope),
            Ok(()) => c.at = to,
        }
        applied
    }

    /// Drops the copies of units not among `others`.
    pub(crate) fn keep_copies(&mut self, others: &[String]) {
        let gone: Vec<String> = self.copies.keys().filter(|s| !others.contains(s)).cloned().collect();
        for scope in gone {
            self.drop_copy(&scope);
        }
    }

    /// Drops every copy (the lease went to another writer, who holds its own).
    pub(crate) fn drop_copies(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.copies) {
            self.global.unabsorb_copy(&mut c.figures);
        }
    }

    fn drop_copy(&mut self, scope: &str) {
        if let Some(mut c) = self.copies.remove(scope) {
            self.global.unabsorb_copy(&mut c.figures);
        }
    }
}
