#!/usr/bin/env python3
"""Open a diffaudit HTML report in headless Chromium: check it and take a screenshot.

    python benchmarks/screenshot_report.py report.html out.png [--width 1280] [--height 2000] [--full-page]

Talks to Chromium over the DevTools protocol through ``--remote-debugging-pipe`` (file descriptors 3 and 4,
NUL-separated JSON), so it needs nothing beyond the standard library and Debian's ``chromium`` package. While the
page loads it records console errors, uncaught exceptions, JavaScript dialogs (``alert``) and every network request;
the tests import :func:`inspect_report` from this file. The exit status is 1 when the page was not clean.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

# No sandbox (containers, root), no GPU, nothing that phones home; every host name resolves to nothing, so a request
# that slipped past the page's CSP could not leave the machine either (it would still show up in the request log).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


class DevToolsPipe:
    """Minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, chromium: str, user_data_dir: str, width: int, height: int, timeout: float = 30.0):
        self.timeout = timeout
        cmd_r, self._cmd_w = os.pipe()  # we write commands; Chromium reads fd 3
        self._res_r, res_w = os.pipe()  # Chromium writes fd 4; we read
        # Move the child's ends above 4 first so dup2 onto 3/4 never clobbers the other one.
        child_r, child_w = _dup_high(cmd_r), _dup_high(res_w)
        os.close(cmd_r)
        os.close(res_w)

        def _setup() -> None:  # runs in the child between fork and exec
            os.dup2(child_r, 3, inheritable=True)
            os.dup2(child_w, 4, inheritable=True)

        args = [chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=_setup, close_fds=False)
        os.close(child_r)
        os.close(child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        my_id = self._next_id
        msg: dict = {"id": my_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == my_id:
                if "error" in m:
                    raise RuntimeError(f"DevTools {method} failed: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        for e in self.events:
            if e["method"] == method:
                return e
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read(deadline)
            if "method" in m:
                self.events.append(m)
                if m["method"] == method:
                    return m

    def _read(self, deadline: float | None = None) -> dict:
        deadline = deadline or time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium over the DevTools pipe")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise RuntimeError(f"Chromium closed the DevTools pipe; stderr tail:\n{err}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        m = json.loads(raw)
        if m.get("method") == "Page.javascriptDialogOpening":  # dismiss at once, or the page would hang on it
            self._next_id += 1
            reply = {"id": self._next_id, "method": "Page.handleJavaScriptDialog", "params": {"accept": False}}
            if m.get("sessionId"):
                reply["sessionId"] = m["sessionId"]
            os.write(self._cmd_w, json.dumps(reply).encode() + b"\0")
        return m

    def close(self) -> None:
        try:
            os.write(self._cmd_w, json.dumps({"id": 10**9, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._res_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()


def _dup_high(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered above 4 (so dup2 onto 3 and 4 in the child clobbers neither).

    Python's own descriptors are non-inheritable (PEP 446), so with ``close_fds=False`` only 0-4 reach Chromium.
    """
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def inspect_report(html_path: str | os.PathLike, screenshot: str | os.PathLike | None = None, *, width: int = 1280,
                   height: int = 2000, full_page: bool = False, evaluate: tuple[str, ...] = (),
                   settle_s: float = 0.3, chromium: str | None = None) -> dict:
    """Load ``html_path`` from disk in headless Chromium and report what happened.

    Returns a dict: ``console_errors`` (console.error/warn calls, uncaught exceptions and browser log entries of
    level warning or error, CSP violations included), ``requests`` (URLs of every request except the report itself
    and ``data:`` URLs), ``dialogs`` (alert/confirm/prompt messages), ``ready`` (the ``data-ready`` attribute the
    report's script sets on ``<html>``), ``evaluated`` (the values of the ``evaluate`` expressions, run after load),
    ``screenshot`` (the path written, if asked).
    """
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("chromium not found (Debian: apt-get install chromium); looked in "
                                + ", ".join(CHROMIUM_CANDIDATES))
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"html_path: no such file: {str(html_path)!r}")
    url = path.as_uri()
    with tempfile.TemporaryDirectory(prefix="diffaudit-chromium-") as profile:
        cdp = DevToolsPipe(chromium, profile, width, height)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            sess = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for dom in ("Page", "Runtime", "Log", "Network"):
                cdp.send(f"{dom}.enable", session=sess)
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sess)
            cdp.events.clear()
            cdp.send("Page.navigate", {"url": url}, session=sess)
            cdp.wait_event("Page.loadEventFired")
            time.sleep(settle_s)
            evaluated = []
            for expr in evaluate:
                r = cdp.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sess)
                if "exceptionDetails" in r:
                    raise RuntimeError(f"evaluate {expr!r} threw: {r['exceptionDetails']}")
                evaluated.append(r["result"].get("value"))
            ready = cdp.send("Runtime.evaluate", {"expression": "document.documentElement.getAttribute('data-ready')",
                                                  "returnByValue": True}, session=sess)["result"].get("value")
            shot = None
            if screenshot is not None:
                params: dict = {"format": "png"}
                if full_page:
                    m = cdp.send("Page.getLayoutMetrics", session=sess)["cssContentSize"]
                    params.update(captureBeyondViewport=True,
                                  clip={"x": 0, "y": 0, "width": width, "height": m["height"], "scale": 1})
                data = cdp.send("Page.captureScreenshot", params, session=sess)["data"]
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(data))
                shot = str(screenshot)
            # Drain whatever arrived meanwhile (late console messages).
            cdp.send("Runtime.evaluate", {"expression": "1"}, session=sess)
        finally:
            cdp.close()
    errors, requests, dialogs = [], [], []
    for e in cdp.events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                  for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            ent = p["entry"]
            errors.append(f"log[{ent.get('source')}]: {ent.get('text')} {ent.get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            u = p.get("request", {}).get("url", "")
            if u != url and not u.startswith("data:"):
                requests.append(u)
        elif m == "Page.javascriptDialogOpening":
            dialogs.append(p.get("message", ""))
    return {"console_errors": errors, "requests": requests, "dialogs": dialogs, "ready": ready,
            "evaluated": evaluated, "screenshot": shot}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="the report's HTML file")
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--full-page", action="store_true", help="capture the whole page, not only the window")
    a = ap.parse_args(argv)
    r = inspect_report(a.report, a.out, width=a.width, height=a.height, full_page=a.full_page)
    print(f"screenshot: {r['screenshot']}")
    print(f"script ran (data-ready): {r['ready']!r}")
    for k in ("console_errors", "requests", "dialogs"):
        print(f"{k}: {len(r[k])}")
        for v in r[k]:
            print(f"  {v}")
    clean = r["ready"] == "1" and not (r["console_errors"] or r["requests"] or r["dialogs"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
