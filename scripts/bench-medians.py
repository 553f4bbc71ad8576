#!/usr/bin/env python3
"""Medians per scenario label of the JSON lines scripts/bench.sh collects.

Usage: scripts/bench-medians.py RESULTS.jsonl
Prints one Markdown table per label: each headline figure's median, and the range
over the runs in brackets.
"""
import json
import statistics
import sys

# (field path, caption) per figure worth a median.
FIGURES = [
    ("acks_per_s", "acks/s"),
    ("ack_latency.p50_ms", "ack p50 ms"),
    ("ack_latency.p99_ms", "ack p99 ms"),
    ("deliveries_per_s", "deliveries/s"),
    ("delivery_latency.p50_ms", "delivery p50 ms"),
    ("delivery_latency.p99_ms", "delivery p99 ms"),
    ("deliveries_per_server_cpu_s", "deliveries per server CPU-s"),
    ("server_cpu_s", "server CPU s"),
    ("bench_cores_busy", "bench cores busy"),
    ("kib_per_connection", "KiB per connection"),
    ("open_s", "open s"),
    ("connections_per_s", "connections/s"),
]


def pick(record, path):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    by_label = {}
    with open(sys.argv[1], encoding="utf-8") as results:
        for line in results:
            line = line.strip()
            if line.startswith("{"):
                record = json.loads(line)
                by_label.setdefault(record.get("label", record.get("scenario")), []).append(record)
    for label, records in by_label.items():
        ok = sum(1 for r in records if r.get("ok"))
        print(f"\n{label}: {len(records)} runs, {ok} ok")
        print("| figure | median | range |")
        print("|---|---|---|")
        for path, caption in FIGURES:
            values = [v for v in (pick(r, path) for r in records) if v is not None]
            if values:
                print(f"| {caption} | {statistics.median(values):g} | {min(values):g}–{max(values):g} |")
        bound = sum(1 for r in records if r.get("generator_bound"))
        if bound:
            print(f"(the load generator was the bottleneck in {bound} of {len(records)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
