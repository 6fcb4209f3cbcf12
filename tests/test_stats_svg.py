"""Tests of vblk.stats.svg: the path picture, its labels by id, measured and unmeasured hops."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tests.test_stats_view import _stats
from vblk.stats.svg import path_labels, path_svg
from vblk.stats.view import export_views

NS = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> list[tuple[str, str]]:
    root = ET.fromstring(svg)
    return [(t.get("id", ""), t.text or "") for t in root.iter(f"{NS}text")]


def test_labels_carry_the_numbers() -> None:
    (view,) = export_views(_stats(1000, 10_000), _stats(3000, 50_000), 1.0)
    labels = path_labels(view["total"], "export d")
    assert labels["title"] == "export d"
    assert labels["host_io-p50"].startswith("p50 ") and "µs" in labels["host_io-p50"]
    assert labels["backend-p99"].startswith("p99 ")
    assert labels["rate"].startswith("2k/s requests")


def test_svg_is_xml_with_every_label_by_id() -> None:
    (view,) = export_views(None, _stats(3000, 50_000), 1.0)
    labels = path_labels(view["total"])
    texts = _texts(path_svg(labels))
    by_id = {ident: text for ident, text in texts if ident}
    assert by_id == labels
    for stage in ("queue_wait", "device", "host_io", "complete", "notify"):
        assert ("", stage) in texts


def test_unmeasured_hops_are_marked_and_dashed() -> None:
    svg = path_svg(path_labels(None))
    texts = [text for _, text in _texts(svg)]
    assert texts.count("not measured here") == 4  # guest user space, guest kernel, virtqueue, KVM
    for layer in ("Guest user space", "Guest kernel", "KVM", "Host I/O stack", "Disk"):
        assert layer in texts
    root = ET.fromstring(svg)
    dashed = [r for r in root.iter(f"{NS}rect") if r.get("stroke-dasharray")]
    assert len(dashed) == 4


def test_no_numbers_before_requests() -> None:
    labels = path_labels(None)
    assert labels["device-p50"] == "p50 -" and labels["rate"] == "no requests yet"
