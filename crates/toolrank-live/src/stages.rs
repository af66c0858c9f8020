//! The sink stage, split into shards by user (`--sink-shards`): each shard has a lease of
//! its own, whose fencing token its sinks' writes carry, and sinks of its own, written
//! from the merged view with the keys of its users only (shard 0 also the agents'). The
//! merged view keeps the patterns of the shards this writer holds. With one shard this is
//! the single sink writer of the crate docs.

use crate::lease::SinkLease;
use crate::sinks::Scheduler;
use toolrank_engine::{shard_of, Changes, Engine};
use toolrank_sink::Wired;

/// One shard of the sink stage.
pub(crate) struct Stage {
    pub lease: SinkLease,
    pub sinks: Scheduler,
}

/// The lease scope of shard `shard` of `count` under `scope`: the scope itself when the
/// stage is not split, so that a single writer's lease keeps its name.
pub(crate) fn lease_scope(scope: &str, shard: u32, count: u32) -> String {
    match count {
        1 => scope.to_owned(),
        _ => format!("{scope}/shard-{shard}-of-{count}"),
    }
}

/// Every shard's stage, by shard.
pub(crate) struct Stages(Vec<Stage>);

impl Stages {
    /// A stage per element of `sinks` (each shard's sinks), with the lease `lease` makes
    /// for each shard.
    pub(crate) fn new(sinks: Vec<Vec<Wired>>, mut lease: impl FnMut(u32, u32) -> SinkLease) -> Stages {
        let count = sinks.len().max(1) as u32;
        Stages(sinks.into_iter().enumerate().map(|(shard, wired)| Stage { lease: lease(shard as u32, count), sinks: Scheduler::new(wired) }).collect())
    }

    pub(crate) fn count(&self) -> u32 {
        self.0.len() as u32
    }

    /// How many shards this writer holds.
    pub(crate) fn held(&self) -> usize {
        self.0.iter().filter(|s| s.lease.held()).count()
    }

    pub(crate) fn any_held(&self) -> bool {
        self.0.iter().any(|s| s.lease.held())
    }

    pub(crate) fn all_held(&self) -> bool {
        self.0.iter().all(|s| s.lease.held())
    }

    pub(crate) fn has_sinks(&self) -> bool {
        self.0.iter().any(|s| !s.sinks.is_empty())
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Stage> {
        self.0.iter()
    }

    pub(crate) fn get(&self, shard: u32) -> &Stage {
        &self.0[shard as usize]
    }

    /// Whether no sink of any shard would write at a flush now ([`Scheduler::resting`]).
    pub(crate) fn resting(&self, backlog: Option<std::time::Duration>) -> bool {
        self.0.iter().all(|s| s.sinks.resting(backlog))
    }

    /// Waits for every shard's running writes; `false` if one failed.
    pub(crate) fn collect_all(&mut self, rt: &tokio::runtime::Runtime, visibility: &mut crate::latency::Visibility, retried: &mut u64) -> bool {
        self.0.iter_mut().fold(true, |ok, s| s.sinks.collect_all(rt, visibility, retried) & ok)
    }

    pub(crate) fn get_mut(&mut self, shard: u32) -> &mut Stage {
        &mut self.0[shard as usize]
    }

    /// What of `changes` (keys of `view`) each shard writes, by shard: the patterns of
    /// its users, and shard 0 the agents too.
    pub(crate) fn split(&self, changes: Changes, view: &Engine) -> Vec<Changes> {
        let count = self.count();
        if count == 1 {
            return vec![changes];
        }
        let mut split: Vec<Changes> = (0..count).map(|_| Changes::default()).collect();
        for k in changes.patterns {
            split[shard_of(view.name(k.user), count) as usize].patterns.push(k);
        }
        split[0].agents = changes.agents;
        split
    }
}
