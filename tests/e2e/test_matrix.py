"""Compatibility matrix: everyday QEMU device set-ups against the backend run with no flags.

Each case boots the guest (TCG, 2 vCPUs) against a fresh ``vblk serve IMAGE --socket S``
(or qemu-storage-daemon with only what it requires, ``VBLK_E2E_BACKEND=qsd``), with the
vhost-user-blk-pci properties of the case, and checks what the guest sees in
/sys/block/vda and that a short fio verify (1 MiB blocks, then mixed random writes on
both queues) passes. The cases pair the properties rather than take their product:
every queue-size x indirect_desc pair, both event_idx and config-wce values, num-queues
unset, 1, 2, 4 and 8, and discard / write-zeroes off.

``VBLK_E2E_MATRIX_QUEUES=N`` gives the backend N queues explicitly (``--num-queues`` /
``num-queues=``), to compare backends past their defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import guest as guest_tool
import pytest
from e2e_backend import KIND, Boot, StartBackend, workload

pytestmark = pytest.mark.e2e

SMP = 2
#: None: the backend's default queue count, as a user who passes no flag gets.
BACKEND_QUEUES = (
    int(os.environ["VBLK_E2E_MATRIX_QUEUES"]) if "VBLK_E2E_MATRIX_QUEUES" in os.environ else None
)
#: A case that hangs is killed well before the suite's own bound.
CASE_TIMEOUT = 150.0


@dataclass(frozen=True)
class Case:
    queue_size: int = 128
    num_queues: int = 0  # 0: unset, QEMU gives one queue per vCPU
    event_idx: bool = True
    indirect_desc: bool = True
    config_wce: bool = True
    discard: bool = True
    write_zeroes: bool = True

    @property
    def device_opts(self) -> str:
        def onoff(v: bool) -> str:
            return "on" if v else "off"

        return (
            f"queue-size={self.queue_size},event_idx={onoff(self.event_idx)},"
            f"indirect_desc={onoff(self.indirect_desc)},config-wce={onoff(self.config_wce)},"
            f"discard={onoff(self.discard)},write-zeroes={onoff(self.write_zeroes)}"
        )

    @property
    def name(self) -> str:
        return self.device_opts.replace("=", "").replace(",", "-") + f"-nq{self.num_queues}"


CASES = [
    Case(),  # QEMU's defaults: ring of 128, one queue per vCPU
    Case(queue_size=1024, num_queues=1, event_idx=False, config_wce=False),
    Case(queue_size=128, num_queues=2, indirect_desc=False),
    Case(queue_size=256, num_queues=4, event_idx=False, indirect_desc=False, discard=False,
         write_zeroes=False),
    Case(queue_size=1024, num_queues=8, config_wce=False),
    Case(queue_size=1024, num_queues=2, indirect_desc=False, write_zeroes=False),
    Case(queue_size=256, num_queues=0, discard=False),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_default_backend_serves_the_set_up(
    case: Case, start_backend: StartBackend, boot: Boot
) -> None:
    backend = start_backend(f"m{CASES.index(case)}", size=256 << 20, num_queues=BACKEND_QUEUES)
    run = boot(
        backend,
        workload("matrix.sh"),
        num_queues=case.num_queues,
        smp=SMP,
        extra_device_opts=case.device_opts,
        timeout=CASE_TIMEOUT,
    )
    v = guest_tool.parse_values(run.output)
    assert run.rc == 0, run.output
    assert v.get("fio_big") == "ok", run.output
    assert v.get("fio_small") == "ok", run.output
    assert v["dmesg_errors"] == "0", run.output
    # The guest uses one queue per vCPU at most.
    assert int(v["queues"]) == min(case.num_queues or SMP, SMP)
    # Linux fills the ring: one slot per request with indirect descriptors, two without.
    assert int(v["nr_tags"]) == case.queue_size // (1 if case.indirect_desc else 2)
    # Without indirect descriptors, the longest request must fit the ring.
    if not case.indirect_desc:
        assert int(v["max_segments"]) + 2 <= case.queue_size
    if KIND == "vblk":
        assert v["max_segments"] == "126"
    assert (int(v["discard_max"]) > 0) == case.discard
    assert (int(v["wz_max"]) > 0) == case.write_zeroes
    if KIND == "vblk":
        assert v["cache_type"] == "write_back"  # VIRTIO_BLK_F_FLUSH; qsd's export has no FLUSH
    if case.config_wce:
        assert v["cache_switch"] == "ok" and v["cache_type_after"] == "write_through"
    else:
        assert v["cache_switch"] == "no" and v["cache_type_after"] == v["cache_type"]
