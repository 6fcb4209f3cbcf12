"""The daemon's TOML config: exports and their QoS, checked like export-add."""

from __future__ import annotations

import pytest

from vblk.control.config import ConfigError, parse_config

GOOD = """
[[export]]
id = "d0"
spec = "/tmp/d0.img"
socket = "/tmp/d0.sock"
num_queues = 2

[export.qos]
iops = 1500

[[export]]
id = "d1"
spec = "/tmp/d1.img"
socket = "/tmp/d1.sock"
"""


def test_parses_exports_and_qos() -> None:
    (p0, q0), (p1, q1) = parse_config(GOOD)
    assert p0["id"] == "d0" and p0["num_queues"] == 2 and q0 == {"id": "d0", "iops": 1500}
    assert p1["queue_size"] == 32768 and q1 is None
    assert parse_config("") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[export", "not valid TOML"),
        ("disks = 1", "unknown top-level"),
        ('export = "x"', "array of tables"),
        ('[[export]]\nid = "d0"\nspec = "s"', "socket is required"),
        ('[[export]]\nid = "d0"\nspec = "s"\nsocket = "k"\nnum_queues = "2"', "num_queues"),
        ('[[export]]\nid = "d0"\nspec = "s"\nsocket = "k"\n[export.qos]\niops = -1', "iops"),
        (GOOD.replace('"d1"', '"d0"'), "used twice"),
        ('[[export]]\nid = "d0"\nspec = "s"\nsocket = "k"\n[export.qos]\nid = "d1"', "no id"),
    ],
)
def test_errors_name_the_export_and_parameter(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert needle in str(e.value)
