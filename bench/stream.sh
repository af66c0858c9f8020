#!/usr/bin/env bash
# The live path's throughput against the local stack, in one run:
#   1. generate a stream-style history (SESSIONS sessions, ~3.3 events each) and load it
#      into a fresh topic of the local broker;
#   2. the broker's raw consume rate, with a no-op rdkafka consumer (kafka-drain);
#   3. `toolrank consume kafka` from the same topic into both sinks (DynamoDB Local and
#      Valkey), with CPU time and peak memory from /usr/bin/time;
#   4. latency: first the broker's own (the no-op consumer alone on a topic of its own),
#      then the same consumer group, caught up, while `toolrank produce --generate`
#      publishes LATENCY_SESSIONS more sessions at a steady LATENCY_RATE events/s; the
#      consumer reports p50/p99 from each message's Kafka timestamp to its effect being
#      written to Valkey, and the DynamoDB writes while they arrive (the exit's flush,
#      which writes what the budget held, reported apart).
# After each consumer, the sinks are compared with `toolrank replay` of the same records
# ("exact: ..."; the script fails if they differ).
# Prints events/s of both, toolrank's share of the raw rate, CPU µs per event, DynamoDB
# write requests and write capacity units per event (the sink's, and the state table's:
# checkpoints and leases), Valkey commands per event, the peak RSS and the latency; for
# the steady-rate phase too, what its writes cost per event.
# Usage: bench/stream.sh   (SESSIONS=300000 gives ~1M events; LATENCY_RATE=5000,
#                           LATENCY_SESSIONS=30000 gives ~100k events over ~20 s;
#                           DYNAMODB_FLUSH_MS=1000 is the consumers' --dynamodb-flush-ms;
#                           CONSUME_ARGS adds flags to both consumers, e.g.
#                           CONSUME_ARGS="--checkpoint-secs 30"; STEADY_ARGS adds flags to
#                           the steady-rate consumer only, e.g. STEADY_ARGS="--dynamodb-max-wcu 1000";
#                           PROFILE=1 adds where the CPU time goes, from perf samples)
set -euo pipefail
SESSIONS="${SESSIONS:-300000}"
PARTITIONS="${PARTITIONS:-6}"
LATENCY_RATE="${LATENCY_RATE:-5000}"
LATENCY_SESSIONS="${LATENCY_SESSIONS:-30000}"
DYNAMODB_FLUSH_MS="${DYNAMODB_FLUSH_MS:-1000}"
read -ra CONSUME_ARGS <<< "${CONSUME_ARGS:-}"
read -ra STEADY_ARGS <<< "${STEADY_ARGS:-}"
source "$(dirname "$0")/prelude.sh"
cargo build --release --locked -p toolrank-consume-kafka --bin kafka-drain >&2
RUN="bench$$"
TOPIC="$RUN-events"; TABLE="$RUN-AgentTable"
# The Kafka path does not read the table's stream; without one, DynamoDB Local does not slow
# down as its stream bookkeeping grows (it did, 50x, after a few runs).
"$BIN/toolrank" setup --topic "$TOPIC" --dead-letter-topic "$TOPIC-dl" --partitions "$PARTITIONS" --table "$TABLE" --no-stream >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --out "$WORK/history.jsonl" >&2
EVENTS=$(wc -l < "$WORK/history.jsonl")
# Agent items must exist for the DynamoDB sink to score them.
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
"$BIN/toolrank" produce --to dynamodb --table "$TABLE" "$WORK/catalog.jsonl" >&2
"$BIN/toolrank" produce --topic "$TOPIC" "$WORK/history.jsonl" >&2

echo "events: $EVENTS in $PARTITIONS partitions"
RAW=$(/usr/bin/time -f "%U %S" -o "$WORK/raw-time" "$BIN/kafka-drain" "$TOOLRANK_KAFKA_BROKERS" "$TOPIC")
echo "raw rdkafka consume:   $RAW"
# What reading alone costs: the floor of toolrank's CPU per event.
echo "raw consume CPU:       $(awk -v n="$EVENTS" '{printf "%.2f CPU µs/record", ($1 + $2) * 1e6 / n}' "$WORK/raw-time")"
/usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$BIN/toolrank" consume kafka --topic "$TOPIC" --group "$RUN" \
  --dead-letter-topic "$TOPIC-dl" --table "$TABLE" --namespace "$RUN" --until-idle 3 --dynamodb-flush-ms "$DYNAMODB_FLUSH_MS" --today "$TODAY" "${CONSUME_ARGS[@]}" 2> "$WORK/consume.log"
read -r WALL USER SYS RSS < "$WORK/time"
python3 - "$EVENTS" "$WALL" "$USER" "$SYS" "$RSS" "$RAW" "$WORK/consume.log" <<'PY'
import re, sys
events, wall, user, sys_, rss = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
raw = float(re.search(r"rate (\d+)", sys.argv[6]).group(1))
log = open(sys.argv[7]).read()
vk = int(re.search(r"(\d+) Valkey commands", log).group(1))
busy = max(wall - 3.0, 1e-9)  # --until-idle waits 3 s after the last message
rate = events / busy
print(f"toolrank consume:      {rate:,.0f} events/s ({rate / raw:.0%} of raw), {(user + sys_) * 1e6 / events:.2f} CPU µs/event")
split = re.search(r"read for ([\d.]+) s .*exit took ([\d.]+) s", log)
if split:
    reading, exiting = map(float, split.groups())
    print(f"  while reading:        {events / reading:,.0f} events/s ({events / reading / raw:.0%} of raw) for {reading:.1f} s; then the exit (last checkpoint, the sinks' deferred writes) {exiting:.1f} s")
print(f"Valkey sink:           {vk / events:.3f} commands/event")
print(f"peak memory:           {rss / 1024:.0f} MiB")
print(re.search(r"^consumed.*$", log, re.M).group(0))
PY

costs() {  # the DynamoDB writes per event of a consumer's log
python3 - "$1" <<'PY'
import re, sys
log = open(sys.argv[1]).read()
events = int(re.search(r"consumed (\d+) messages", log).group(1))
ddb = int(re.search(r"(\d+) DynamoDB requests", log).group(1))
state = int(re.search(r"(\d+) state table writes", log).group(1))
sink_units, state_units = map(float, re.search(r"units consumed: DynamoDB sink (\d+), state table (\d+)", log).groups())
print(f"DynamoDB sink:         {ddb / events:.4f} write requests/event, {sink_units / events:.4f} write units/event")
print(f"state table:           {state / events:.4f} write requests/event, {state_units / events:.4f} write units/event (checkpoints, leases)")
PY
}
costs "$WORK/consume.log"

exact "$RUN" "$TABLE" "$WORK/history.jsonl"

# 3b. With PROFILE=1: where that CPU time goes. Another group reads the same records under
# `perf record` (Debian's linux-perf) into sinks of its own (a table of its own: the
# DynamoDB sink's fence is the table's; its Valkey keys in database 1, so that its
# start-up rewrite does not SCAN the first run's keys); its samples split the unprofiled
# run's CPU µs per event by part (bench/profile.py).
if [ "${PROFILE:-0}" = 1 ]; then
  command -v perf >/dev/null || { echo "PROFILE=1 needs perf (apt-get install linux-perf)" >&2; exit 1; }
  "$BIN/toolrank" setup --topic "$TOPIC" --dead-letter-topic "$TOPIC-dl" --partitions "$PARTITIONS" --table "$TABLE-profile" --no-stream >&2
  "$BIN/toolrank" produce --to dynamodb --table "$TABLE-profile" "$WORK/catalog.jsonl" >&2
  perf record -q -F 499 --call-graph dwarf,16384 -o "$WORK/perf.data" "$BIN/toolrank" consume kafka --topic "$TOPIC" --group "$RUN-profile" \
    --dead-letter-topic "$TOPIC-dl" --table "$TABLE-profile" --namespace "$RUN-profile" --valkey-url "$TOOLRANK_VALKEY_URL/1" --until-idle 3 \
    --dynamodb-flush-ms "$DYNAMODB_FLUSH_MS" --today "$TODAY" "${CONSUME_ARGS[@]}" 2> "$WORK/profile.log"
  echo "where the CPU µs per event go (perf samples of a second run, same records):"
  perf script -F comm,ip,sym -i "$WORK/perf.data" 2>/dev/null | python3 bench/profile.py "$EVENTS" "$(python3 -c "print($USER + $SYS)")"
fi

# 4. Latency at a steady rate. First the broker's own delivery latency, with the no-op
# consumer alone on a topic of its own (a second consumer fetching beside toolrank's would
# double the broker's fetch load, and tansu serves fetches on about one core).
"$BIN/toolrank" setup --topic "$TOPIC-raw" --dead-letter-topic "$TOPIC-dl" --partitions "$PARTITIONS" --table "$TABLE" --no-stream >&2
"$BIN/kafka-drain" "$TOOLRANK_KAFKA_BROKERS" "$TOPIC-raw" --latency > "$WORK/raw-latency" &
RAW_LATENCY=$!
sleep 5
"$BIN/toolrank" produce --topic "$TOPIC-raw" --generate --sessions "$LATENCY_SESSIONS" --seed 43 --rate "$LATENCY_RATE" 2> "$WORK/produce-raw.log"
wait "$RAW_LATENCY" || true
# Then toolrank: the same consumer group, caught up and holding its checkpointed state.
METRICS=127.0.0.1:$((20000 + $$ % 20000))
"$BIN/toolrank" consume kafka --topic "$TOPIC" --group "$RUN" --dead-letter-topic "$TOPIC-dl" \
  --table "$TABLE" --namespace "$RUN" --metrics-addr "$METRICS" --dynamodb-flush-ms "$DYNAMODB_FLUSH_MS" --today "$TODAY" "${CONSUME_ARGS[@]}" "${STEADY_ARGS[@]}" 2> "$WORK/latency.log" &
CONSUMER=$!
# Steady state: wait until it owns every partition, has loaded their checkpointed state and
# has written Valkey once (a new process rewrites its whole namespace first).
for _ in $(seq 1200); do
  [ "$(grep -c 'partition assigned' "$WORK/latency.log" || true)" -ge "$PARTITIONS" ] &&
    curl -sf "http://$METRICS/metrics" | grep -Eq '^toolrank_valkey_commands_total [1-9]' && break
  sleep 0.5
done
# ... and has finished its start-up writes: a consumer that took the sink lease before its
# partitions were assigned rewrites what their claims changed (seconds on this state), and
# records arriving meanwhile would measure that, not the steady rate. The counter moves
# when a write ends, so 12 still seconds cover one still running.
valkey_commands() { curl -sf "http://$METRICS/metrics" | awk '/^toolrank_valkey_commands_total /{print $2}'; }
LAST=$(valkey_commands); STILL=0
for _ in $(seq 240); do
  sleep 1
  NOW=$(valkey_commands)
  if [ "$NOW" = "$LAST" ]; then STILL=$((STILL + 1)); else STILL=0; fi
  LAST=$NOW
  [ "$STILL" -ge 12 ] && break
done
counters() {  # messages read and DynamoDB sink requests so far (the metrics publish each second)
  curl -sf "http://$METRICS/metrics" | awk '/^toolrank_messages_total /{m=$2} /^toolrank_dynamodb_requests_total /{d=$2} END{print m+0, d+0}'
}
BEFORE=$(counters)
"$BIN/toolrank" produce --topic "$TOPIC" --generate --sessions "$LATENCY_SESSIONS" --seed 43 --rate "$LATENCY_RATE" 2> "$WORK/produce.log"
sleep 3
AFTER=$(counters)
kill -TERM "$CONSUMER"; wait "$CONSUMER" || true
if LATENCY=$(grep -o 'visible in the sinks: p50.*' "$WORK/latency.log"); then
  echo "latency at a steady $LATENCY_RATE events/s, produce to visible in Valkey: ${LATENCY#visible in the sinks: }"
  echo "  of which in toolrank (read to visible): $(grep -o 'from reading a record to visible: p50.*' "$WORK/latency.log" | sed 's/.*visible: //')"
  echo "the broker's own delivery latency at the same rate, a no-op consumer alone: $(cat "$WORK/raw-latency")"
  echo "the steady-rate consumer's writes, its exit's flush included:"
  costs "$WORK/latency.log"
  read -r M0 D0 <<< "$BEFORE"; read -r M1 D1 <<< "$AFTER"
  python3 -c "import sys; m, d = $M1 - $M0, $D1 - $D0; print(f'DynamoDB sink while the records arrived (before the exit): {d:.0f} write requests for {m:.0f} events, {d / max(m, 1):.4f}/event')"
  grep -E '^(consumed|waited on)' "$WORK/latency.log" | sed 's/^/steady-rate consumer: /'
else
  echo "no latency figures; the consumer's log ends:"; tail -5 "$WORK/latency.log"
fi
grep '^produced' "$WORK/produce.log"
"$BIN/toolrank" generate --sessions "$LATENCY_SESSIONS" --seed 43 --out "$WORK/steady.jsonl" >&2
exact "$RUN" "$TABLE" "$WORK/history.jsonl" "$WORK/steady.jsonl"
