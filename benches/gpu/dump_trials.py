"""Every trial of a results DB with its metrics (about ten points each) and its events:
`python3 dump_trials.py results.db`; for a device run's log, where `sweep report` is more
than the lease has time for."""

import sqlite3
import sys

db = sqlite3.connect(sys.argv[1])
for tid, label, status in db.execute("select id, label, status from trials"):
    print(f"== {label} [{status}] {tid}")
    rows = list(
        db.execute("select step, name, value from metrics where trial_id = ? order by step", (tid,))
    )
    for name in sorted({n for _, n, _ in rows}):
        pts = [(s, v) for s, n, v in rows if n == name]
        if len(pts) > 12:
            pts = pts[:: len(pts) // 10] + [pts[-1]]
        print(f"{name}: " + ", ".join(f"{s}:{v:.4g}" if v is not None else f"{s}:-" for s, v in pts))
    for event in db.execute(
        "select step, kind, message from events where trial_id = ? and kind != 'progress' order by id",
        (tid,),
    ):
        print("event", event)
