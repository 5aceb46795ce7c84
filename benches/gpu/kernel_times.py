"""Sums an ncu CSV of gpu__time_duration.sum by kernel name over the last `--steps` of the
launches (measure.sh's `profile` part): one line a kernel, longest first, with its count.

    python3 benches/gpu/kernel_times.py ncu.csv [--share 0.5]

--share: the part of the launches to keep, from the end (the timed steps after warmup)."""
import argparse
import collections
import csv

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--share", type=float, default=0.5)
args = ap.parse_args()
with open(args.csv) as f:
    lines = f.readlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
rows = [r for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
rows = rows[int(len(rows) * (1 - args.share)):]
total, count = collections.Counter(), collections.Counter()
for r in rows:
    name = r["Kernel Name"].split("(")[0][:70]
    us = float(r["Metric Value"].replace(",", "")) / 1e3  # ns
    total[name] += us
    count[name] += 1
whole = sum(total.values())
print(f"{len(rows)} launches, {whole / 1e3:.2f} ms")
for name, us in total.most_common(45):
    print(f"{us:9.1f} us {count[name]:5d}x  {name}")
