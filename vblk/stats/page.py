"""The live page of the metrics server: the path picture, relabelled every second.

Two routes for the daemon's ``--metrics`` HTTP server:

* ``/``: :func:`page_html`, one self-contained HTML file (inline CSS, JS and
  the SVG of :mod:`vblk.stats.svg`; no CDN, no build step);
* ``/api/stats``: :meth:`LiveStats.payload`, JSON with the text of every
  numbered label of the picture, computed here by the same
  :func:`~vblk.stats.svg.path_labels` as ``vblk ctl export-stats --svg``, so
  the page's script only copies strings into the SVG by id.

Rates and percentiles cover the interval since the previous ``/api/stats``
request (so one open page refreshes them every second).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from vblk.stats.svg import path_labels, path_svg
from vblk.stats.view import export_views

#: How often the page asks for new numbers, in milliseconds.
REFRESH_MS = 1000

_SCRIPT = """
const params = new URLSearchParams(location.search);
let exportId = params.get("export") || "";
let refreshes = 0;
async function refresh() {
  try {
    const r = await fetch("api/stats" + (exportId ? "?export=" + encodeURIComponent(exportId) : ""),
                          {cache: "no-store"});
    const data = await r.json();
    for (const [id, text] of Object.entries(data.labels)) {
      const el = document.getElementById(id);
      if (el) el.textContent = text;
    }
    refreshes += 1;
    document.getElementById("status").textContent =
      "exports: " + (data.exports.join(", ") || "none") + " · refreshed " + refreshes +
      " times · " + new Date().toLocaleTimeString();
    document.body.dataset.refreshes = String(refreshes);
  } catch (e) {
    document.getElementById("status").textContent = "no answer from the daemon: " + e;
  }
}
refresh();
setInterval(refresh, %d);
"""

_STYLE = """
body { font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif; margin: 16px; color: #1d2330; }
#status { color: #8a8f98; font-size: 12px; margin-top: 6px; }
.legend { font-size: 12px; color: #555; max-width: 760px; }
"""


def page_html() -> str:
    """The whole page: the picture with no numbers yet, and the script that fills them in."""
    svg = path_svg(path_labels(None))
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>vblk: the virtio-blk path</title>"
        f"<style>{_STYLE}</style></head><body>\n{svg}"
        "<div id='status'>waiting for the first numbers</div>\n"
        "<p class='legend'>Blue boxes are measured by vblk (one request in the sample rate is "
        "timed; p50/p99 over the last second). Grey dashed boxes are the parts of the path "
        "inside the guest and KVM, which a vhost-user backend cannot see.</p>\n"
        f"<script>{_SCRIPT % REFRESH_MS}</script></body></html>\n"
    )


class LiveStats:
    """What ``/api/stats`` answers: labels for one export, windowed since the previous answer.

    ``snapshot`` returns an ``export-stats`` result. Safe to call from the
    HTTP server's threads.
    """

    def __init__(
        self, snapshot: Callable[[], Any], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._lock = threading.Lock()
        self._before: Any = None
        self._t_before = 0.0

    def payload(self, export: str = "") -> dict[str, Any]:
        with self._lock:
            after = self._snapshot()
            now = self._clock()
            before, t_before = self._before, self._t_before
            self._before, self._t_before = after, now
        views = export_views(before, after, now - t_before if before is not None else 0.0)
        chosen = next((v for v in views if v["id"] == export), views[0] if views else None)
        title = f"vblk export {chosen['id']} ({chosen['state']})" if chosen else ""
        return {
            "exports": [v["id"] for v in views],
            "export": chosen["id"] if chosen else None,
            "labels": path_labels(chosen["total"] if chosen else None, title),
            "views": views,
        }

    def payload_json(self, export: str = "") -> bytes:
        return json.dumps(self.payload(export)).encode()
