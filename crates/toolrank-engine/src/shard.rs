//! Sink shards: the patterns split by user, so that several writers each write a part of
//! the rankings, and each keeps only the figures of that part.

/// A set of the `count` shards by user: those a sink writer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shards {
    held: Vec<bool>,
}

impl Shards {
    /// Every shard of `count` (at least one).
    pub fn all(count: u32) -> Shards {
        Shards { held: vec![true; count.max(1) as usize] }
    }

    /// None of `count` shards.
    pub fn none(count: u32) -> Shards {
        Shards { held: vec![false; count.max(1) as usize] }
    }

    /// Only `shard` of `count`.
    pub fn only(shard: u32, count: u32) -> Shards {
        let mut shards = Shards::none(count);
        shards.set(shard, true);
        shards
    }

    pub fn count(&self) -> u32 {
        self.held.len() as u32
    }

    pub fn holds(&self, shard: u32) -> bool {
        self.held.get(shard as usize).copied().unwrap_or(false)
    }

    /// Takes (`held`) or gives up `shard`.
    pub fn set(&mut self, shard: u32, held: bool) {
        if let Some(h) = self.held.get_mut(shard as usize) {
            *h = held;
        }
    }

    pub fn is_all(&self) -> bool {
        self.held.iter().all(|&h| h)
    }

    /// The shards held, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.iter().enumerate().filter(|(_, &h)| h).map(|(i, _)| i as u32)
    }

    /// Whether the patterns of `user` are in a held shard.
    pub fn keeps(&self, user: &str) -> bool {
        self.held[shard_of(user, self.count()) as usize]
    }
}

/// The shard of `user`'s patterns among `count`: FNV-1a of the user id, the same in
/// every process and every version (writers of one group must agree on it).
pub fn shard_of(user: &str, count: u32) -> u32 {
    let hash = user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % u64::from(count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_shard_is_fixed_and_users_spread_over_the_shards() {
        // FNV-1a's published test vector: the hash may never change.
        assert_eq!(shard_of("a", u32::MAX), (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as u32);
        let mut per_shard = [0; 4];
        for u in 0..4000 {
            per_shard[shard_of(&format!("USR{u:05}"), 4) as usize] += 1;
        }
        assert!(per_shard.iter().all(|&n| (800..1200).contains(&n)), "{per_shard:?}");
        assert_eq!(shard_of("USR00001", 1), 0);
    }

    #[test]
    fn held_shards_keep_their_users() {
        let mut shards = Shards::none(3);
        assert!(!shards.keeps("USR1"));
        shards.set(shard_of("USR1", 3), true);
        assert!(shards.keeps("USR1"));
        assert_eq!(shards.iter().collect::<Vec<_>>(), vec![shard_of("USR1", 3)]);
        assert!(Shards::all(3).is_all() && Shards::all(0).count() == 1);
    }
}
