#!/usr/bin/env bash
# Chaos: faults at random moments while two consumers in one group read a generated
# history from Kafka into both sinks; after the last fault, both sinks must equal
# `toolrank replay` of the same records while the consumers still run.
#   1. a history of SESSIONS sessions (modifies, removes, redeliveries) with MALFORMED
#      malformed lines and one poison record (over --max-record-bytes) mixed in, published
#      at RATE records/s to a broker of the script's own;
#   2. two consumers (a supervisor restarts each when it dies) with LEASE_SECS leases,
#      writing a Valkey of the script's own and DynamoDB Local through a throttling proxy;
#   3. at random moments: KILLS kill -9 of a consumer, one SIGSTOP of the sink holder for
#      twice its lease, a broker restart (down BROKER_DOWN s), Valkey down VALKEY_DOWN s
#      (back empty), DynamoDB answering every request with ProvisionedThroughputExceeded
#      for THROTTLE s;
#   4. once the records are published and the faults over, the sinks are compared with
#      replay every 2 s until they are equal (at most CONVERGE_LIMIT s): the time to converge.
# Prints the faults injected and when, records, dead letters, the longest lag (records
# behind, both consumers) and the time to converge; fails if the sinks never converge.
# Usage: bench/chaos.sh   (SESSIONS=60000 gives ~200k records; RATE=4000; KILLS=10;
#                          VALKEY_DOWN=30; THROTTLE=60; BROKER_DOWN=5; MALFORMED=1000;
#                          LEASE_SECS=5; CHAOS_SEED picks the moments and the history;
#                          CONSUME_ARGS adds flags to both consumers; a run that does not
#                          converge keeps the logs in CHAOS_KEEP, default $TMPDIR or /tmp)
# scripts/test runs a short one: SESSIONS=2000 RATE=1000 KILLS=3 VALKEY_DOWN=5 THROTTLE=8 MALFORMED=50.
set -euo pipefail
SESSIONS="${SESSIONS:-60000}"
RATE="${RATE:-4000}"
KILLS="${KILLS:-10}"
VALKEY_DOWN="${VALKEY_DOWN:-30}"
THROTTLE="${THROTTLE:-60}"
BROKER_DOWN="${BROKER_DOWN:-5}"
MALFORMED="${MALFORMED:-1000}"
LEASE_SECS="${LEASE_SECS:-5}"
CONVERGE_LIMIT="${CONVERGE_LIMIT:-300}"
CHAOS_SEED="${CHAOS_SEED:-$RANDOM}"
PARTITIONS="${PARTITIONS:-4}"
read -ra CONSUME_ARGS <<< "${CONSUME_ARGS:-}"
source "$(dirname "$0")/prelude.sh"
cargo build --release --locked -p toolrank-consume-kafka --bin kafka-drain >&2
RANDOM=$CHAOS_SEED
RUN="chaos$$"
TOPIC="$RUN-events"; TABLE="$RUN-AgentTable"; GROUP="$RUN"; NS="$RUN"
# A free port below the kernel's ephemeral range: a service the faults stop is restarted on
# its port, and while it is down, clients connecting to an ephemeral port can take it as
# their own (a TCP self-connect), so that the service could not bind it again.
port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
# Below the range when there is room (else any free port).
for p in [random.randrange(10000, low) for _ in range(100)] if low > 11000 else [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        print(s.getsockname()[1])
        break
    except OSError:
        pass
PY
}
BROKER_PORT=$(port); CHAOS_VALKEY_PORT=$(port); PROXY_PORT=$(port); METRICS_A=$(port); METRICS_B=$(port)
BROKERS="127.0.0.1:$BROKER_PORT"
# Every command of the script talks to its own broker and Valkey.
export TOOLRANK_KAFKA_BROKERS="$BROKERS" TOOLRANK_VALKEY_URL="redis://127.0.0.1:$CHAOS_VALKEY_PORT"
STACK_PYTHON=$(source infra/local/config && echo "$STACK_HOME/venv/bin/python")
START=$SECONDS
FAULTS="$WORK/faults"; : > "$FAULTS"
fault() { echo "$((SECONDS - START)) s: $*" >> "$FAULTS"; }

# The services the faults hit are the script's own: the shared stack stays untouched.
mkdir -p "$WORK/kafka"
broker() { (cd "$WORK/kafka" && RUST_LOG="${RUST_LOG:-tansu_broker::coordinator=info}" exec "$TOOLRANK_TANSU" broker --storage-engine sqlite://tansu.db \
  --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" >> "$WORK/broker.log" 2>&1) & echo $! > "$WORK/broker.pid"; }
valkey() { "$TOOLRANK_VALKEY_SERVER" --port "$CHAOS_VALKEY_PORT" --bind 127.0.0.1 --save "" --appendonly no > /dev/null 2>&1 & echo $! > "$WORK/valkey.pid"; }
listening() { for _ in $(seq 300); do (: < "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
broker; valkey
python3 bench/throttling_proxy.py "$PROXY_PORT" "${AWS_ENDPOINT_URL_DYNAMODB#http://}" "$WORK/throttle" > "$WORK/proxy.out" &
PROXY=$!
listening "$BROKER_PORT"; listening "$CHAOS_VALKEY_PORT"; listening "$PROXY_PORT"
SUPERVISORS=()
cleanup() {  # the measurement is over: everything the script started goes, at once
  touch "$WORK/stop"
  # A supervisor may be starting a consumer as this runs: kill until both have ended.
  # (Not a bare `wait`: it would wait for the tee that prints this script's output.)
  for _ in $(seq 50); do
    for f in a b; do kill -9 "$(cat "$WORK/$f.pid" 2> /dev/null)" 2> /dev/null || true; done
    local running=0
    for pid in "${SUPERVISORS[@]}"; do kill -0 "$pid" 2> /dev/null && running=1; done
    [ "$running" = 0 ] && break
    sleep 0.2
  done
  for f in broker valkey; do kill "$(cat "$WORK/$f.pid" 2> /dev/null)" 2> /dev/null || true; done
  kill "$PROXY" 2> /dev/null || true
}
trap 'cleanup; exec 1>&3; wait "$TEE" 2>/dev/null || true; python3 bench/table.py "${BENCH_ARGS[@]}" "$WORK/stdout"; rm -rf "$WORK"' EXIT

"$BIN/toolrank" setup --brokers "$BROKERS" --topic "$TOPIC" --dead-letter-topic "$TOPIC-dl" --partitions "$PARTITIONS" --table "$TABLE" --no-stream >&2
"$BIN/toolrank" generate --sessions "$SESSIONS" --seed "$CHAOS_SEED" --out "$WORK/history.jsonl" >&2
grep '"SK":{"S":"METADATA"}' "$WORK/history.jsonl" > "$WORK/catalog.jsonl" || true
"$BIN/toolrank" produce --to dynamodb --table "$TABLE" "$WORK/catalog.jsonl" 2> /dev/null
# Malformed lines (not JSON, cut short, an unknown eventName) and one poison record mixed in:
# `replay` skips them as the consumers dead-letter them.
python3 - "$WORK/history.jsonl" "$WORK/input.jsonl" "$MALFORMED" "$CHAOS_SEED" <<'PY'
import random, sys
lines = open(sys.argv[1]).read().splitlines()
rng = random.Random(int(sys.argv[4]))
bad = []
for i in range(int(sys.argv[3])):
    line = rng.choice(lines)
    bad.append(["not json", line[: rng.randrange(1, len(line) - 1)], line.replace('"eventName":"', '"eventName":"UNKNOWN', 1)][i % 3])
bad.append('{"padding":"' + "x" * 500_000 + '"}')
for b in bad:
    lines.insert(rng.randrange(len(lines) + 1), b)
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
PY
RECORDS=$(wc -l < "$WORK/input.jsonl")

supervise() {  # supervise NAME METRICS_PORT: a consumer, started again whenever it dies
  while [ ! -e "$WORK/stop" ]; do
    AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$PROXY_PORT" "$BIN/toolrank" consume kafka --brokers "$BROKERS" --topic "$TOPIC" \
      --group "$GROUP" --dead-letter-topic "$TOPIC-dl" --table "$TABLE" --namespace "$NS" \
      --today "$TODAY" --lease-secs "$LEASE_SECS" --metrics-addr "127.0.0.1:$2" "${CONSUME_ARGS[@]}" 2>> "$WORK/$1.log" &
    echo $! > "$WORK/$1.pid"
    wait $! || true
  done
}
supervise a "$METRICS_A" &
SUPERVISORS+=($!)
supervise b "$METRICS_B" &
SUPERVISORS+=($!)
"$BIN/toolrank" produce --brokers "$BROKERS" --topic "$TOPIC" --rate "$RATE" "$WORK/input.jsonl" 2> "$WORK/produce.log" &
PRODUCER=$!
SPAN=$((RECORDS / RATE + 1))

at() { sleep "$1"; shift; "$@"; }
kill9() { local v; v=$([ $((RANDOM % 2)) = 0 ] && echo a || echo b); kill -9 "$(cat "$WORK/$v.pid")" 2> /dev/null && fault "kill -9 consumer $v" || true; }
holder() {  # the pid of the running sink lease holder, if any
  local owner pid
  owner=$("$STACK_PYTHON" - "$GROUP/$TOPIC" <<'PY' || true
import boto3, os, sys
db = boto3.client("dynamodb", region_name=os.environ.get("AWS_REGION", "us-east-1"))
item = db.get_item(TableName="toolrank-state", Key={"PK": {"S": f"kafka/{sys.argv[1]}/sink-writer"}, "SK": {"S": "lease"}}).get("Item")
print(item["Owner"]["S"] if item else "")
PY
)
  pid=$(echo "$owner" | awk -F- 'NF > 2 {print $(NF-1)}')
  [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null && echo "$pid"
}
stop_holder() {  # SIGSTOP the sink lease holder for twice its lease (waiting up to 30 s for one)
  local pid=""
  for _ in $(seq 30); do pid=$(holder || true); [ -n "$pid" ] && break; sleep 1; done
  [ -n "$pid" ] || { fault "no running sink holder to stop within 30 s"; return; }
  kill -STOP "$pid"
  fault "SIGSTOP sink holder (pid $pid) for $((LEASE_SECS * 2)) s"
  sleep $((LEASE_SECS * 2)); kill -CONT "$pid" 2> /dev/null || true
}
down() { local pid; pid=$(cat "$WORK/$1.pid"); kill "$pid"; while kill -0 "$pid" 2> /dev/null; do sleep 0.1; done; }
restart_broker() { down broker; fault "broker down $BROKER_DOWN s"; sleep "$BROKER_DOWN"; broker; }
valkey_down() { down valkey; fault "Valkey down $VALKEY_DOWN s"; sleep "$VALKEY_DOWN"; valkey; fault "Valkey back, empty"; }
throttle() { touch "$WORK/throttle"; fault "DynamoDB throttling for $THROTTLE s"; sleep "$THROTTLE"; rm -f "$WORK/throttle"; fault "DynamoDB answers again"; }
moment() { echo $((2 + RANDOM % SPAN)); }
JOBS=()
for _ in $(seq "$KILLS"); do at "$(moment)" kill9 & JOBS+=($!); done
at "$(moment)" stop_holder & JOBS+=($!)
at "$(moment)" restart_broker & JOBS+=($!)
at "$(moment)" valkey_down & JOBS+=($!)
at "$(moment)" throttle & JOBS+=($!)

# The longest lag while it runs: records behind on both consumers' partitions.
faulting() { for j in "${JOBS[@]}"; do kill -0 "$j" 2> /dev/null && return 0; done; return 1; }
LAG=0
while kill -0 "$PRODUCER" 2> /dev/null || faulting; do
  NOW=0
  for m in "$METRICS_A" "$METRICS_B"; do
    L=$(curl -sf --max-time 1 "http://127.0.0.1:$m/metrics" | awk '/^toolrank_source_lag_records /{printf "%d", $2}' || true)
    NOW=$((NOW + ${L:-0}))
  done
  [ "$NOW" -gt "$LAG" ] && LAG=$NOW
  sleep 1
done
wait "$PRODUCER" || { echo "the producer failed:"; tail -5 "$WORK/produce.log"; exit 1; }
QUIET=$SECONDS
CONVERGED=""
while [ $((SECONDS - QUIET)) -lt "$CONVERGE_LIMIT" ]; do
  if OUT=$(exact "$NS" "$TABLE" "$WORK/input.jsonl"); then CONVERGED=$((SECONDS - QUIET)); break; fi
  sleep 2
done

echo "faults:"
sort -n "$FAULTS" | sed 's/^/  /'
echo "records:               $RECORDS published ($MALFORMED malformed, 1 poison of 500 KB), $PARTITIONS partitions, seed $CHAOS_SEED"
kill "$PROXY"; wait "$PROXY" 2> /dev/null || true
echo "dead letters:          $("$BIN/kafka-drain" "$BROKERS" "$TOPIC-dl" | awk '{print $2}') on the topic for $((MALFORMED + 1)) bad records (a partition read again after a kill sends its letters again)"
echo "DynamoDB refused:      $(cat "$WORK/proxy.out") connections while throttling"
echo "longest lag:           $LAG records"
if [ -z "$CONVERGED" ]; then
  echo "converged:             NO, not within $CONVERGE_LIMIT s of the last fault and the last record"
  echo "$OUT"
  tail -n 40 "$WORK/a.log" "$WORK/b.log"
  KEPT="${CHAOS_KEEP:-${TMPDIR:-/tmp}}/$RUN"
  mkdir -p "$KEPT" && cp "$WORK"/{a,b,broker}.log "$FAULTS" "$WORK/input.jsonl" "$KEPT/"
  echo "the consumers' and the broker's logs, the faults and the input are kept in $KEPT"
  exit 1
fi
echo "converged:             $CONVERGED s after the last fault and the last record"
echo "$OUT"
