"""The largest relative difference between two results DBs' train/loss, trial by trial (by
label) and step by step: `python3 cmp_losses.py reference.db other.db`."""

import sqlite3
import sys


def losses(path):
    q = (
        "select t.label, m.step, m.value from metrics m join trials t on t.id = m.trial_id "
        "where m.name = 'train/loss'"
    )
    return {(label, step): v for label, step, v in sqlite3.connect(path).execute(q)}


a, b = losses(sys.argv[1]), losses(sys.argv[2])
keys = sorted(set(a) & set(b))
if not keys:
    sys.exit(f"{sys.argv[1]} and {sys.argv[2]} share no (trial, step) loss")
worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-9) for k in keys)
print(f"{sys.argv[1]} vs {sys.argv[2]}: {len(keys)} losses (of {len(a)} / {len(b)}), max rel diff {worst:.3g}")
