//! A unit's aggregates without its sessions: see [`AggregateCopy`].

use crate::{
    figures_of, version_of, Aggregates, DeltaHead, Engine, Shards, SnapshotFigures, StateError, Sym, DELTA_VERSION, OLD_DELTA_VERSION, SNAPSHOT_VERSION,
};
use rustc_hash::FxHashSet;

/// What a sink writer keeps of a unit another consumer owns: its aggregates and Agent
/// items, not its sessions. Read from the unit's base snapshot (which stores them before
/// the sessions) and moved along its checkpoint log by the aggregate difference every
/// delta carries, so it costs the size of the rankings, not of the history, and a delta
/// costs what it changed in the figures.
pub struct AggregateCopy {
    /// An engine without sessions: its catalog and aggregates merge like any engine's.
    /// With sink shards, only the patterns of their users: its `shards`.
    engine: Engine,
}

impl AggregateCopy {
    /// The copy of a unit whose checkpoint log is `base` (empty: a new unit) and `deltas`,
    /// keeping the patterns of the users of `shards` only (all without). A log written
    /// by an older version (version 2 deltas carry no aggregates) is restored in full
    /// once, then stripped of its sessions.
    pub fn from_log(base: &[u8], deltas: &[Vec<u8>], shards: Option<&Shards>) -> Result<AggregateCopy, StateError> {
        let figures_only = || {
            let mut copy = AggregateCopy::from_snapshot(base, shards)?;
            for d in deltas {
                copy.apply_delta(d, None)?;
            }
            Ok(copy)
        };
        match figures_only() {
            Err(StateError::DeltaWithoutFigures) => {
                let mut engine = if base.is_empty() { Engine::new() } else { Engine::restore(base)? };
                for d in deltas {
                    engine.apply_delta(d)?;
                }
                Ok(AggregateCopy::from_engine(engine, shards))
            }
            copy => copy,
        }
    }

    fn from_snapshot(bytes: &[u8], shards: Option<&Shards>) -> Result<AggregateCopy, StateError> {
        if bytes.is_empty() {
            return Ok(AggregateCopy::of(Engine::new(), shards));
        }
        match version_of(bytes, StateError::Version)? {
            (SNAPSHOT_VERSION, body) => {
                // Only the beginning is read: the sessions after it are not even decoded.
                let f: SnapshotFigures = postcard::from_bytes(body)?;
                let mut engine = Engine { strings: f.strings, sequences: f.sequences, catalog: f.catalog, aggregates: f.aggregates, ..Engine::default() };
                engine.strings.rebuild();
                engine.sequences.rebuild();
                Ok(AggregateCopy::of(engine, shards))
            }
            _ => Engine::restore(bytes).map(|engine| AggregateCopy::from_engine(engine, shards)),
        }
    }

    /// A copy of `engine`'s aggregates and Agent items; its sessions are dropped.
    fn from_engine(mut engine: Engine, shards: Option<&Shards>) -> AggregateCopy {
        engine.flush();
        let figures =
            Engine { strings: engine.strings, sequences: engine.sequences, catalog: engine.catalog, aggregates: engine.aggregates, ..Engine::default() };
        AggregateCopy::of(figures, shards)
    }

    /// The copy of the figures of `engine`, without the patterns `shards` does not keep.
    fn of(mut engine: Engine, shards: Option<&Shards>) -> AggregateCopy {
        if let Some(shards) = shards.filter(|s| !s.is_all()) {
            let strings = &engine.strings;
            engine.aggregates.patterns.retain(|k, _| shards.keeps(strings.get(k.user)));
            engine.shards = Some(shards.clone());
        }
        AggregateCopy { engine }
    }

    /// Drops the patterns of `shard` of `count` (this writer gave the shard up).
    pub fn give_up_shard(&mut self, shard: u32, count: u32) {
        self.engine.give_up_shard(shard, count);
    }

    /// Moves the copy along its log by one delta, and `global` (the merged view it is
    /// absorbed into, if any) with it. A delta that does not decode changes nothing; one
    /// of version 2 fails with [`StateError::DeltaWithoutFigures`].
    pub fn apply_delta(&mut self, bytes: &[u8], global: Option<&mut Engine>) -> Result<(), StateError> {
        let (version, body) = version_of(bytes, StateError::DeltaVersion)?;
        match version {
            DELTA_VERSION => {}
            OLD_DELTA_VERSION => return Err(StateError::DeltaWithoutFigures),
            other => return Err(StateError::DeltaVersion(other)),
        }
        // Only the head: the sessions after it are not even decoded.
        let head: DeltaHead = postcard::from_bytes(body)?;
        let e = &mut self.engine;
        let shards = e.shards.as_ref();
        let figures = figures_of(&mut e.strings, &mut e.sequences, &head, |user| shards.is_none_or(|s| s.keeps(user)))?;
        e.aggregates.absorb(&figures, 1, |_, s| s);
        e.apply_catalog(head.catalog);
        match global {
            Some(g) => {
                g.add_figures(&mut e.forward, (&e.strings, &e.sequences), &figures, 1);
                e.forward_catalog(g);
            }
            None => e.catalog_changes.clear(),
        }
        Ok(())
    }
}

impl Engine {
    /// Adds another unit's copy to this merged view (see [`absorb`](Self::absorb)).
    pub fn absorb_copy(&mut self, copy: &mut AggregateCopy) {
        self.absorb(&mut copy.engine);
    }

    /// Takes back what [`absorb_copy`](Self::absorb_copy) added for `copy` in its
    /// current state.
    pub fn unabsorb_copy(&mut self, copy: &mut AggregateCopy) {
        self.unabsorb(&mut copy.engine);
    }

    /// Puts `new` (the same unit read again, from a newer base) in the place of `old` in
    /// this merged view, moving the sum by their difference only: the changes recorded
    /// (what the sinks write next) are the keys whose figures or Agent items differ, as
    /// if the copy had followed the deltas the new base replaced, not every key of the
    /// unit twice.
    pub fn replace_copy(&mut self, old: &mut AggregateCopy, new: &mut AggregateCopy) {
        let (old, new) = (&mut old.engine, &mut new.engine);
        let was = old.forward.catalog(&old.strings, &old.catalog, &mut self.strings);
        let now = new.forward.catalog(&new.strings, &new.catalog, &mut self.strings);
        let now_ids: FxHashSet<Sym> = now.iter().map(|(id, _)| *id).collect();
        for (id, _) in was.into_iter().filter(|(id, _)| !now_ids.contains(id)) {
            self.set_meta(id, None);
        }
        for (id, meta) in now {
            if self.catalog.get(&id).and_then(|slot| slot.meta.as_ref()) != Some(&meta) {
                self.set_meta(id, Some(meta));
            }
        }
        let mut difference = Aggregates::default();
        for (e, sign) in [(new, 1), (old, -1)] {
            e.forward.absorb((&e.strings, &e.sequences), (&mut self.strings, &mut self.sequences), &e.aggregates, sign, &mut difference, |_| true);
        }
        self.aggregates.absorb(&difference, 1, |_, s| s);
    }
}
