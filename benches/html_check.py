"""Opens a `sweep report --html` page in headless Chromium and checks it the way a reader
would: it renders (a full-page screenshot is saved), nothing on the console is an error or
an uncaught exception, nothing was fetched from the network, every chart is an inline SVG
with a non-zero size, and clicking a column header of the configurations table sorts its
rows by that column.

    python3 benches/html_check.py REPORT.html --screenshot shot.png [--chromium chromium]

Needs Chromium and the websocket-client package; talks to Chromium over its DevTools
protocol. Exits 1 and says why when a check fails.
"""
import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Tab:
    def __init__(self, url):
        self.ws = websocket.create_connection(url, timeout=30)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def drain(self, seconds):
        end = time.time() + seconds
        self.ws.settimeout(0.2)
        while time.time() < end:
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                pass
        self.ws.settimeout(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--chromium", default="chromium")
    args = ap.parse_args()
    page = "file://" + os.path.abspath(args.page)
    port = free_port()
    profile = tempfile.mkdtemp(prefix="html-check-")
    proc = subprocess.Popen(
        [
            args.chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            "--window-size=1400,1000",
            "--remote-allow-origins=*",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failures = []
    try:
        for _ in range(100):
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
                break
            except Exception:
                time.sleep(0.1)
        else:
            sys.exit("chromium did not start")
        tab = Tab(ws_url)
        for domain in ("Runtime", "Log", "Network", "Page"):
            tab.call(f"{domain}.enable")
        tab.call("Page.navigate", url=page)
        tab.drain(2.0)
        for e in tab.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                failures.append(f"uncaught exception: {p['exceptionDetails'].get('text')}")
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning"):
                failures.append(f"console {p['type']}: {p.get('args')}")
            if m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                failures.append(f"log {p['entry']['level']}: {p['entry'].get('text')}")
            if m == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not url.startswith("file://"):
                    failures.append(f"fetched {url}")
        title = tab.eval("document.title")
        charts = tab.eval(
            "Array.from(document.querySelectorAll('figure svg')).map("
            "s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height])"
        )
        if not charts or any(w <= 0 or h <= 0 for w, h in charts):
            failures.append(f"charts: {charts}")
        # Sort the configurations table by its val/bpb column, both ways.
        col = tab.eval(
            "Array.from(document.querySelector('table.sortable').tHead.rows[0].cells)"
            ".findIndex(c => c.textContent === 'val/bpb')"
        )
        values = (
            "Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
            f".map(r => parseFloat(r.cells[{col}].textContent))"
        )
        click = f"document.querySelector('table.sortable').tHead.rows[0].cells[{col}].click()"
        tab.eval(click)
        up = tab.eval(values)
        tab.eval(click)
        down = tab.eval(values)
        if up != sorted(up) or down != sorted(down, reverse=True):
            failures.append(f"sorting: {up} then {down}")
        height = tab.eval("document.documentElement.scrollHeight")
        shot = tab.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1},
        )
        with open(args.screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(
            f"{title!r}: {len(charts)} inline charts {charts}, val/bpb column sorted "
            f"ascending {up} and descending, page {height} px high, screenshot "
            f"{args.screenshot}"
        )
    finally:
        proc.terminate()
        proc.wait()
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
