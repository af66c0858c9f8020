//! The counters of a run, and the Prometheus metrics they are published as.

use std::sync::Once;
use toolrank_engine::{Applied, StateStats};
use toolrank_metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

static DESCRIBED: Once = Once::new();

/// The help of every metric a live consumer records.
fn describe() {
    describe_counter!("toolrank_messages_total", "Messages or stream records read.");
    describe_counter!("toolrank_redeliveries_skipped_total", "Records at or below a checkpointed position, skipped.");
    describe_counter!("toolrank_changes_total", "Changes applied to the table state, by outcome.");
    describe_counter!("toolrank_dead_letters_total", "Bad records dead-lettered.");
    describe_counter!("toolrank_checkpoints_total", "Checkpoints saved.");
    describe_counter!("toolrank_tombstones_expired_total", "Tombstones of removed items forgotten after the horizon.");
    describe_counter!("toolrank_names_collected_total", "Interned names (user IDs, ...) of units forgotten once nothing referred to them.");
    describe_counter!("toolrank_sink_writes_total", "Sink write rounds.");
    describe_counter!("toolrank_sink_plans_held_total", "Sink rounds planned, then held back by the write budget (--dynamodb-writes-per-event), by sink.");
    describe_counter!("toolrank_dynamodb_requests_total", "DynamoDB write requests of the sink (no label); every API request by operation (label op).");
    describe_counter!("toolrank_state_writes_total", "DynamoDB write requests to the state table (checkpoints, bucket logs, leases).");
    describe_counter!("toolrank_valkey_commands_total", "Valkey commands of the sink.");
    describe_counter!("toolrank_retried_errors_total", "Failed sink writes, checkpoints and lease renewals (retried).");
    describe_counter!("toolrank_dynamodb_write_units_total", "Write capacity units DynamoDB reported consumed, by table (whole units).");
    describe_counter!("toolrank_blocked_milliseconds_total", Unit::Milliseconds, "Time the consumer's loop waited on a sink write or a checkpoint save.");
    describe_gauge!("toolrank_state_sessions", "Sessions held by the units this consumer owns (live ones and those holding only tombstones).");
    describe_gauge!("toolrank_state_live_rows", "Current executions held by the units this consumer owns.");
    describe_gauge!("toolrank_state_tombstones", "Removed items remembered (until --tombstone-horizon-secs) by the units this consumer owns.");
    describe_gauge!("toolrank_state_bytes", Unit::Bytes, "Approximate heap bytes of the engine state of the units this consumer owns.");
    describe_gauge!("toolrank_source_lag_records", "Records on the input past this consumer's positions (Kafka: by the high watermarks).");
    describe_gauge!("toolrank_sink_lease_held", "1 while this consumer holds the sink lease (it writes the sinks for the group), else 0.");
    describe_gauge!("toolrank_source_age_seconds", Unit::Seconds, "Age of the latest record applied when it was applied (a stream's iterator age).");
    describe_histogram!("toolrank_visible_latency_seconds", Unit::Seconds, "Record creation to its effect in the sinks.");
    describe_histogram!("toolrank_own_latency_seconds", Unit::Seconds, "Record read by this consumer to its effect in the sinks.");
    describe_histogram!("toolrank_sink_write_seconds", Unit::Seconds, "One sink write, from its start to its end, by sink.");
    describe_histogram!("toolrank_checkpoint_seconds", Unit::Seconds, "One checkpoint save, from its start to its end.");
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Messages or stream records read.
    pub messages: u64,
    /// Messages below a unit's checkpointed position (redelivered).
    pub skipped_redeliveries: u64,
    pub changes: u64,
    pub stale: u64,
    pub ignored: u64,
    pub dead_letters: u64,
    pub checkpoints: u64,
    /// Tombstones of removed items forgotten after the horizon.
    pub tombstones_expired: u64,
    /// Interned names (user IDs, ...) forgotten once nothing referred to them.
    pub names_collected: u64,
    /// The engine state of the units this consumer owned at its last checkpoint.
    pub state: StateStats,
    pub sink_writes: u64,
    pub dynamodb_requests: u64,
    /// DynamoDB sink writes started (each coalesces the changes of its interval).
    pub dynamodb_rounds: u64,
    /// Write requests to the state table: checkpoints, bucket logs, leases.
    pub state_writes: u64,
    /// Write capacity units DynamoDB reported consumed: by the sink, by the state table.
    pub dynamodb_write_units: f64,
    pub state_write_units: f64,
    pub valkey_commands: u64,
    /// Failed sink writes, checkpoints and lease renewals (all retried).
    pub retried_errors: u64,
    /// Milliseconds from a record's creation (Kafka timestamp, stream record time) to its
    /// effect being visible in Valkey (DynamoDB without Valkey), measured by the writer.
    pub latency_p50_ms: Option<u64>,
    pub latency_p99_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
    /// The part of it spent in this process: from reading the record to its effect being
    /// visible (what the broker or stream adds before is not toolrank's).
    pub own_latency_p50_ms: Option<u64>,
    pub own_latency_p99_ms: Option<u64>,
    /// Milliseconds the consumer's loop waited on each: where its wall time goes.
    pub dynamodb_ms: u64,
    pub valkey_ms: u64,
    pub checkpoint_ms: u64,
    /// Milliseconds from the first record applied to the last, and from the start of the
    /// exit (the last checkpoint, then the sinks) to its end: a run's wall time split
    /// into reading and the one-off writes after it.
    pub read_ms: u64,
    pub finish_ms: u64,
}

impl Summary {
    /// Copies the running totals into the process's metrics.
    pub fn publish(&self) {
        use toolrank_metrics::{counter, gauge};
        DESCRIBED.call_once(describe);
        let totals = [
            (counter!("toolrank_messages_total"), self.messages),
            (counter!("toolrank_redeliveries_skipped_total"), self.skipped_redeliveries),
            (counter!("toolrank_changes_total", "outcome" => "applied"), self.changes),
            (counter!("toolrank_changes_total", "outcome" => "stale"), self.stale),
            (counter!("toolrank_changes_total", "outcome" => "ignored"), self.ignored),
            (counter!("toolrank_dead_letters_total"), self.dead_letters),
            (counter!("toolrank_checkpoints_total"), self.checkpoints),
            (counter!("toolrank_tombstones_expired_total"), self.tombstones_expired),
            (counter!("toolrank_names_collected_total"), self.names_collected),
            (counter!("toolrank_sink_writes_total"), self.sink_writes),
            (counter!("toolrank_dynamodb_requests_total"), self.dynamodb_requests),
            (counter!("toolrank_state_writes_total"), self.state_writes),
            (counter!("toolrank_valkey_commands_total"), self.valkey_commands),
            (counter!("toolrank_retried_errors_total"), self.retried_errors),
            // Whole units: DynamoDB reports halves for eventually consistent reads.
            (counter!("toolrank_dynamodb_write_units_total", "table" => "sink"), self.dynamodb_write_units.round() as u64),
            (counter!("toolrank_dynamodb_write_units_total", "table" => "state"), self.state_write_units.round() as u64),
            (counter!("toolrank_blocked_milliseconds_total", "on" => "dynamodb"), self.dynamodb_ms),
            (counter!("toolrank_blocked_milliseconds_total", "on" => "valkey"), self.valkey_ms),
            (counter!("toolrank_blocked_milliseconds_total", "on" => "checkpoint"), self.checkpoint_ms),
        ];
        for (metric, value) in totals {
            metric.absolute(value);
        }
        for (name, value) in [
            ("toolrank_state_sessions", self.state.sessions),
            ("toolrank_state_live_rows", self.state.live_rows),
            ("toolrank_state_tombstones", self.state.tombstones),
            ("toolrank_state_bytes", self.state.heap_bytes),
        ] {
            gauge!(name).set(value as f64);
        }
    }

    /// Counts what the engine did with one change.
    pub fn count(&mut self, applied: Applied) {
        match applied {
            Applied::Changed | Applied::Unchanged => self.changes += 1,
            Applied::Stale => self.stale += 1,
            Applied::Ignored => self.ignored += 1,
        }
    }
}
