"""Tests of vblk.stats.page: the self-contained page, /api/stats windows, and the page in Chromium.

The browser test serves the page from a local HTTP server whose stats grow
between requests, as an export's do under load; the guest-driven version
runs against the daemon's metrics server in tests/e2e.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_stats_view import _stats
from vblk.stats.page import LiveStats, page_html

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_page_is_self_contained() -> None:
    html = page_html()
    assert "<svg" in html and "<script>" in html and "api/stats" in html
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # no CDN
    assert "not measured here" in html
    assert "<script src" not in html and "<link" not in html


class _Growing:
    """Stats that grow by ``step`` requests per call, slower each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return _stats(1000 * self.calls * self.calls, 10_000 * self.calls)


def test_payload_windows_between_requests() -> None:
    t = [0.0]
    live = LiveStats(_Growing(), clock=lambda: t[0])
    first = live.payload()
    assert first["exports"] == ["d"] and first["export"] == "d"
    assert first["labels"]["rate"].startswith("0/s")  # no interval yet
    t[0] = 2.0
    second = live.payload("d")
    assert second["labels"]["rate"].startswith("1.5k/s")  # (4000 - 1000) / 2 s
    assert second["labels"]["device-p50"] != first["labels"]["device-p50"]
    assert json.loads(live.payload_json("nope"))["export"] == "d"  # unknown: the first


def test_payload_without_exports() -> None:
    payload = LiveStats(lambda: {"exports": []}).payload()
    assert payload["export"] is None and payload["labels"]["rate"] == "no requests yet"


@pytest.fixture
def page_server() -> Iterator[str]:
    live = LiveStats(_Growing())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                body, ctype = page_html().encode(), "text/html; charset=utf-8"
            elif self.path.startswith("/api/stats"):
                body, ctype = live.payload_json(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def _chromium(url: str, tmp: Path, *extra: str) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


def _label(dom: str, ident: str) -> str:
    m = re.search(rf"id=\"{ident}\"[^>]*>([^<]*)<", dom)
    assert m, ident
    return m.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_page_in_chromium_relabels(page_server: str, tmp_path: Path) -> None:
    budget = "--virtual-time-budget=3500"
    first = _chromium(page_server, tmp_path / "a", budget, "--dump-dom")
    second = _chromium(page_server, tmp_path / "b", budget, "--dump-dom")
    assert int(re.search(r'data-refreshes="(\d+)"', first).group(1)) >= 2  # type: ignore[union-attr]
    for dom in (first, second):
        assert _label(dom, "device-p50").startswith("p50 ") and "µs" in _label(dom, "device-p50")
    assert _label(first, "device-p50") != _label(second, "device-p50")
    assert _label(first, "rate") != _label(second, "rate")
    shot = Path("build/stats-page.png")
    shot.parent.mkdir(exist_ok=True)
    _chromium(
        page_server,
        tmp_path / "c",
        budget,
        f"--screenshot={shot.resolve()}",
        "--window-size=800,820",
    )
    assert shot.stat().st_size > 10_000
