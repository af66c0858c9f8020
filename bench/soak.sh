#!/usr/bin/env bash
# Memory of the live path over a long stream whose items expire: does `toolrank consume
# kafka` stay bounded? For each tombstone horizon in HORIZONS (seconds):
#   1. a consumer (both sinks, metrics on) waits on a fresh topic;
#   2. `toolrank produce --generate --ttl-after LIVE` publishes SESSIONS sessions at RATE
#      records/s, each session's executions removed by TTL (REMOVE records) once LIVE later
#      sessions were published, so the table's live items stay a sliding window of LIVE
#      sessions however long the stream runs (the seed's TTL, compressed in time);
#   3. every SAMPLE_SECS the consumer's RSS and state gauges (live executions, tombstones,
#      sessions held, heap bytes; the consumer measures them every 30 s) are printed;
#   4. after the stream, both sinks are compared with `toolrank replay` of the same records.
# With a horizon shorter than the run, the state levels off at the live window plus a
# horizon's removals; with a week (the default horizon) it grows with every removal seen.
# Usage: bench/soak.sh   (SESSIONS=200000 gives ~1.2M records; LIVE=20000; RATE=10000;
#                         HORIZONS="30 604800"; SAMPLE_SECS=30, the gauges' period; CONSUME_ARGS adds flags)
set -euo pipefail
SESSIONS="${SESSIONS:-200000}"
LIVE="${LIVE:-20000}"
RATE="${RATE:-10000}"
HORIZONS="${HORIZONS:-30 604800}"
SAMPLE_SECS="${SAMPLE_SECS:-30}"
PARTITIONS="${PARTITIONS:-6}"
read -ra CONSUME_ARGS <<< "${CONSUME_ARGS:-}"
source "$(dirname "$0")/prelude.sh"
RUN="soak$$"
METRICS=127.0.0.1:$((20000 + $$ % 20000))
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed 42 --ttl-after "$LIVE" --out "$WORK/history.jsonl" >&2
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
echo "records: $(wc -l < "$WORK/history.jsonl") ($SESSIONS sessions, each removed by TTL $LIVE sessions later), $RATE/s into $PARTITIONS partitions"

gauges() {  # messages read, live executions, tombstones, sessions held, state bytes, tombstones expired
  curl -sf "http://$METRICS/metrics" | awk '
    /^toolrank_messages_total /{m=$2} /^toolrank_state_live_rows /{l=$2} /^toolrank_state_tombstones /{t=$2}
    /^toolrank_state_sessions /{s=$2} /^toolrank_state_bytes /{b=$2} /^toolrank_tombstones_expired_total /{x=$2}
    END{printf "%d %d %d %d %d %d\n", m, l, t, s, b, x}'
}
rss_mib() { awk '/^VmRSS/{printf "%.0f", $2 / 1024}' "/proc/$1/status" 2> /dev/null || echo -; }

for HORIZON in $HORIZONS; do
  # A topic, table and namespace per run: each run's sinks are compared with replay alone.
  TOPIC="$RUN-h$HORIZON"; NS="$RUN-h$HORIZON"; TABLE="$NS-AgentTable"
  "$BIN/toolrank" setup --topic "$TOPIC" --dead-letter-topic "$RUN-dl" --partitions "$PARTITIONS" --table "$TABLE" --no-stream >&2
  # Agent items must exist for the DynamoDB sink to score them.
  "$BIN/toolrank" produce --to dynamodb --table "$TABLE" "$WORK/catalog.jsonl" 2> /dev/null
  /usr/bin/time -f %M -o "$WORK/peak" "$BIN/toolrank" consume kafka --topic "$TOPIC" --group "$NS" --dead-letter-topic "$RUN-dl" --table "$TABLE" --namespace "$NS" \
    --metrics-addr "$METRICS" --tombstone-horizon-secs "$HORIZON" --until-idle 10 --today "$TODAY" "${CONSUME_ARGS[@]}" 2> "$WORK/consume.log" &
  CONSUMER=$!
  for _ in $(seq 600); do
    PID=$(pgrep -P "$CONSUMER" || true)
    [ "$(grep -c 'partition assigned' "$WORK/consume.log" || true)" -ge "$PARTITIONS" ] && break
    sleep 0.5
  done
  echo
  echo "tombstone horizon $HORIZON s:"
  echo "| s | records read | live executions | tombstones | sessions held | state MiB | RSS MiB |"
  echo "|---|---|---|---|---|---|---|"
  "$BIN/toolrank" produce --topic "$TOPIC" --generate --sessions "$SESSIONS" --seed 42 --ttl-after "$LIVE" --rate "$RATE" 2> "$WORK/produce.log" &
  PRODUCER=$!
  START=$SECONDS
  while kill -0 "$CONSUMER" 2> /dev/null; do
    sleep "$SAMPLE_SECS"
    RSS=$(rss_mib "$PID")
    read -r M L T S B X <<< "$(gauges || echo 0 0 0 0 0 0)"
    [ "$M" -gt 0 ] && echo "| $((SECONDS - START)) | $M | $L | $T | $S | $((B / 1048576)) | $RSS |"
  done
  wait "$PRODUCER"
  wait "$CONSUMER" || { echo "the consumer failed:"; tail -5 "$WORK/consume.log"; exit 1; }
  grep -E '^(consumed|state held|[0-9]+ tombstones|[0-9]+ interned names)' "$WORK/consume.log" | sed 's/^/  /'
  echo "  peak RSS $(($(cat "$WORK/peak") / 1024)) MiB"
  exact "$NS" "$TABLE" "$WORK/history.jsonl"
done
