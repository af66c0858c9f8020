"""Where a process's CPU time goes, from `perf script` output of a call-graph recording.

usage: perf script -F comm,ip,sym -i perf.data | python3 bench/profile.py EVENTS

Each sample is put in the first part of the pipeline (in the order of PARTS) whose
functions are on its stack, so nested parts count where they were called from (the sinks'
page faults are the sinks'). Prints a markdown table: each part's share of the samples
and of the CPU µs per event (the process's CPU time split by those shares), and, per
part, the share spent in page faults (first touches of memory, which this VM makes
expensive).
"""
import collections
import os
import sys

# (part, markers): a sample belongs to the first part one of whose markers is a
# substring of a frame on its stack.
PARTS = [
    ("Valkey sink: listing the namespace's keys (a full rewrite's SCAN)", ["namespace_keys"]),
    ("Valkey sink: building the transaction", ["ValkeySink::prepare"]),
    ("Valkey sink: sending it, reading the replies", ["ValkeySink::send", "toolrank_sink_valkey"]),
    ("DynamoDB sink: planning (the recommended set, the changed figures)", ["DynamoSink::plan"]),
    ("DynamoDB sink: comparing, building and sending the items", ["toolrank_sink_dynamodb", "DynamoSink"]),
    # A sink lease holder in a group: reading the other members' checkpoint logs and
    # moving its copies of their aggregates, and the merged sum, along them.
    ("following other members' logs (reading, decoding, adding up)", ["refresh_remotes", "log_catch_up", "advance_copy", "hold_copy", "AggregateCopy", "replace_copy"]),
    ("checkpoints (deltas, snapshots, state table)", ["toolrank_state", "Source>::checkpoint", "Engine::delta", "Engine::snapshot", "lz4_flex", "Checkpointer"]),
    # The engine runs inside the decoder's callback and the sinks' turn: it comes first.
    ("engine: applying changes", ["Engine::apply"]),
    ("engine: sessions to aggregates", ["Engine::flush_to", "Aggregates::apply"]),
    ("sinks: figures of what changed", ["SinkWriter::flush", "Scheduler::write"]),
    ("decoding records (JSON)", ["decode_line", "toolrank_events::"]),
    ("reading Kafka (rdkafka, copying messages)", ["rdkafka", "rd_kafka", "BorrowedMessage", "Source>::read"]),
    ("AWS SDK and HTTP (state table, leases)", ["aws_smithy", "aws_sdk", "hyper", "rustls"]),
]
FAULT = "exc_page_fault"


def samples(lines):
    """Yields (thread name, frames) per sample of `perf script -F comm,ip,sym`."""
    comm, frames = None, []
    for line in lines:
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
        elif comm is None:
            comm = line.strip()
        else:
            parts = line.strip().split(None, 1)
            if len(parts) > 1:
                frames.append(parts[1])
    if comm is not None:
        yield comm, frames


def part_of(frames):
    for name, markers in PARTS:
        if any(m in f for f in frames for m in markers):
            return name
    return "other (allocator, kernel, runtime)"


def main():
    events = float(sys.argv[1])
    cpu_s = float(sys.argv[2]) if len(sys.argv) > 2 else None
    counts, faults = collections.Counter(), collections.Counter()
    total = 0
    for _, frames in samples(sys.stdin):
        total += 1
        part = part_of(frames)
        counts[part] += 1
        faults[part] += any(FAULT in f for f in frames)
    if total == 0:
        sys.exit("profile.py: no samples (was perf recording with --call-graph?)")
    print(f"| part | share of CPU | CPU µs/event | of which page faults |")
    print("|---|---|---|---|")
    for part, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        us = f"{n / total * cpu_s * 1e6 / events:.2f}" if cpu_s else "-"
        print(f"| {part} | {n / total:.1%} | {us} | {faults[part] / n:.0%} |")
    print(f"| all ({total} samples) | 100% | {cpu_s * 1e6 / events:.2f} | {sum(faults.values()) / total:.0%} |" if cpu_s else f"| all ({total} samples) | 100% | - | |")


if __name__ == "__main__":
    main()
