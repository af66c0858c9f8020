//! Wall-clock time and identities.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// An identity for leases and checkpoints unique to this process start: `name`, the
/// process id and the start time, so that two sandboxes or containers reusing a process
/// id are still told apart.
pub fn unique_owner(name: &str) -> String {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("{name}-{}-{started:x}", std::process::id())
}

/// Seconds since the Unix epoch: the clock tombstones are stamped with.
pub(crate) fn now_secs() -> u32 {
    (now_ms() / 1000) as u32
}
