"""Screenshot a page of the MLflow UI in headless Chromium, driven through the DevTools protocol,
so the picture in the README (docs/figures/mlflow_run.png) can be retaken.

    python scripts/screenshot_ui.py URL OUT.png [STEP ...] [--width 1500 --height 950]

Each STEP runs in turn after the first page has loaded:
    TEXT          click the last element (button, link, span, div, label) whose text is TEXT
    nav:URL       go to URL and wait for it to load
    js:EXPRESSION evaluate a JavaScript expression and print its value

The README's picture: the default run in a fresh root, its store served on 127.0.0.1:5066, then
the run's page (MLflow 3 opens in its "GenAI" mode: click "Model training" first; the last step
closes the assistant panel):

    cd /tmp/readme_run && MLXLAB_ROOT=/tmp/readme_run mlxlab-train
    PORT=5066 MLRUNS_DIR=/tmp/readme_run/mlruns scripts/mlflow_server.sh &
    python scripts/screenshot_ui.py "http://127.0.0.1:5066/#/experiments/1" \\
        docs/figures/mlflow_run.png --colors 128 "Model training" \\
        "nav:http://127.0.0.1:5066/#/experiments/1/runs/<run id>" \\
        "js:(()=>{const b=[...document.querySelectorAll('button')].filter(b=>(b.getAttribute('aria-label')||'').toLowerCase().includes('close'));b.forEach(x=>x.click());return b.length})()"

`--colors 128` writes the PNG with a 128-colour palette (Pillow): the UI has few colours, and
the picture shrinks from ~150 KB to ~60 KB. Needs `chromium` (or `--browser PATH`) and the
websocket-client package (`pip install websocket-client`); neither is a dependency of mlxlab.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


class DevTools:
    """One page of a headless Chromium, called through its DevTools websocket."""

    def __init__(self, websocket_url: str) -> None:
        import websocket  # websocket-client: only this script needs it

        # no Origin header: Chromium >= 111 refuses DevTools websockets that send one
        self.ws = websocket.create_connection(websocket_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict:
        """Send one command and return its result (events in between are skipped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        self.ws.close()


def start_browser(browser: str, port: int, width: int, height: int,
                  profile: str) -> subprocess.Popen:
    return subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
         f"--window-size={width},{height}", "about:blank"],
        stderr=subprocess.DEVNULL)


def page_websocket(port: int, tries: int = 50) -> str:
    """The websocket address of the browser's first page, once its DevTools port answers."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as reply:
                tabs = json.load(reply)
            return next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
        except (OSError, StopIteration):
            time.sleep(0.3)
    raise SystemExit(f"screenshot_ui: the browser's DevTools port {port} did not answer")


def click_text(page: DevTools, text: str) -> str:
    """Click the last element whose whole text is `text`; 'clicked' or 'missing'."""
    return page.evaluate(
        "(() => { const els = [...document.querySelectorAll('button,a,span,div,label')]"
        f".filter(e => e.textContent.trim() === {json.dumps(text)});"
        " if (!els.length) return 'missing'; els[els.length - 1].click(); return 'clicked'; })()")


def run_steps(page: DevTools, steps: list[str], load_wait: float, click_wait: float) -> None:
    for step in steps:
        if step.startswith("nav:"):
            page.call("Page.navigate", url=step[4:])
            time.sleep(load_wait)
        elif step.startswith("js:"):
            print(step[:40], "->", page.evaluate(step[3:]))
            time.sleep(click_wait)
        else:
            print(step, "->", click_text(page, step))
            time.sleep(click_wait)


def write_png(data: bytes, out: Path, colors: int) -> None:
    """The captured PNG as it is, or reduced to a palette of `colors` colours."""
    if not colors:
        out.write_bytes(data)
        return
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the first page to open")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("steps", nargs="*", help="TEXT to click, nav:URL or js:EXPRESSION")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=950)
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--port", type=int, default=9333, help="the DevTools port")
    parser.add_argument("--load-wait", type=float, default=12.0,
                        help="seconds to let a page load (MLflow's UI renders late)")
    parser.add_argument("--click-wait", type=float, default=5.0)
    parser.add_argument("--colors", type=int, default=0,
                        help="save with a palette of this many colours (0: as captured)")
    args = parser.parse_intermixed_args(argv)  # options may come between the steps

    with tempfile.TemporaryDirectory(prefix="screenshot_ui-") as profile:
        browser = start_browser(args.browser, args.port, args.width, args.height, profile)
        try:
            page = DevTools(page_websocket(args.port))
            page.call("Page.enable")
            page.call("Emulation.setDeviceMetricsOverride", width=args.width,
                      height=args.height, deviceScaleFactor=1, mobile=False)
            page.call("Page.navigate", url=args.url)
            time.sleep(args.load_wait)
            run_steps(page, args.steps, args.load_wait, args.click_wait)
            data = page.call("Page.captureScreenshot", format="png")["data"]
            page.close()
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    write_png(base64.b64decode(data), args.out, args.colors)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
