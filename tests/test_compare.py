"""bench/compare.py: its parsers and reports without a guest, then the whole tool in --quick.

The quick run is the CI proof that the benchmark works end to end: all three backends,
both queue counts, all four fio jobs, CPU sampling, vblk bench, and all three outputs.
It asserts that the output is complete and well formed, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402

from vblk.bench import Job, Stats, bucket_of, summarize  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed (required in CI): bash scripts/install-deps.sh")
        pytest.skip(f"{tool} is not installed")
    return path


# -- fio's JSON ---------------------------------------------------------------------


def _fio_doc(**read: Any) -> dict[str, Any]:
    """The parts of fio 3.x's JSON the parser reads (one job, reads only unless given)."""
    r = {"total_ios": 1000, "iops": 500.0, "bw_bytes": 2048000, "runtime": 2000,
         "clat_ns": {"percentile": {"99.000000": 1500000}}}  # fmt: skip
    r.update(read)
    w = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "runtime": 0}
    return {
        "fio version": "fio-3.33",
        "jobs": [{"jobname": "j", "error": 0, "read": r, "write": w}],
    }


def test_parse_fio_json_reads_totals_and_p99() -> None:
    r = compare.parse_fio_json(json.dumps(_fio_doc()))
    assert (r.ios, r.iops, r.mb_s, r.runtime_s, r.p99_us) == (1000, 500.0, 2.048, 2.0, 1500.0)


def test_parse_fio_json_ignores_console_noise_around_it() -> None:
    text = "[    3.1] random: crng init done\n" + json.dumps(_fio_doc(), indent=2) + "\n$ \n"
    assert compare.parse_fio_json(text).ios == 1000


def test_parse_fio_json_sums_jobs_and_directions() -> None:
    doc = _fio_doc()
    second = json.loads(json.dumps(doc["jobs"][0]))
    second["write"] = {"total_ios": 10, "iops": 5.0, "bw_bytes": 1000, "runtime": 3000}
    doc["jobs"].append(second)
    r = compare.parse_fio_json(json.dumps(doc))
    assert r.ios == 2010
    assert r.iops == 1005.0
    assert r.runtime_s == 3.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("fio: pid=12, err=5/file:io_u.c", "no JSON"),
        ('{"jobs": [', "malformed"),
        ('{"jobs": []}', "no jobs"),
        (json.dumps(_fio_doc(total_ios=0)), "no I/O"),
        (json.dumps(_fio_doc(iops="fast")), "not a number"),
        ('noise [{"jobs": 1}]', "no jobs"),
    ],
)
def test_parse_fio_json_rejects_unusable_output(text: str, message: str) -> None:
    with pytest.raises(compare.CompareError, match=message):
        compare.parse_fio_json(text)


def test_parse_fio_json_rejects_a_failed_job() -> None:
    doc = _fio_doc()
    doc["jobs"][0]["error"] = 5
    with pytest.raises(compare.CompareError, match="failed: error 5"):
        compare.parse_fio_json(json.dumps(doc))


def test_parse_fio_json_on_real_fio_output(tmp_path: Path) -> None:
    """fio itself (the binary the guest runs): one pass of 256 4k reads per job, two jobs."""
    fio = _need("fio")
    target = tmp_path / "f"
    target.write_bytes(b"\x5a" * (1 << 20))
    p = subprocess.run(
        [fio, "--name=t", f"--filename={target}", "--rw=randread", "--bs=4k", "--size=1M",
         "--numjobs=2", "--group_reporting", "--ioengine=psync", "--output-format=json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = compare.parse_fio_json(p.stdout)
    assert r.ios == 2 * 256
    assert r.iops > 0 and r.mb_s > 0


# -- vblk bench's JSON --------------------------------------------------------------


def test_parse_bench_json_reads_what_vblk_bench_prints() -> None:
    """Built by vblk.bench.summarize itself, so a renamed key there fails here."""
    st = Stats(ios=4000, reads=4000, bytes=4000 * 4096)
    for ns in (100_000, 200_000, 900_000):
        st.hist.counts[bucket_of(ns)] += 1
    st.hist.total, st.hist.sum, st.hist.min, st.hist.max = 3, 1_200_000, 100_000, 900_000
    job = Job("randread", 4096, 32, 1, 2.0, 0, 1 << 20, 50, False, 1)
    text = json.dumps(summarize(job, [st], 2.0), indent=2)
    r = compare.parse_bench_json(text)
    assert (r.ios, r.iops, r.runtime_s) == (4000, 2000.0, 2.0)
    assert r.mb_s == pytest.approx(4000 * 4096 / 2.0 / 1e6, abs=0.01)
    assert 800 < r.p99_us < 1000


def test_parse_bench_json_rejects_errors_and_idle_runs() -> None:
    base = {"ios": 10, "iops": 5.0, "mb_per_s": 0.1, "elapsed_s": 2.0, "errors": 0,
            "lat_us": {"p99": 10.0}}  # fmt: skip
    assert compare.parse_bench_json(json.dumps(base)).ios == 10
    with pytest.raises(compare.CompareError, match="3 I/O errors"):
        compare.parse_bench_json(json.dumps({**base, "errors": 3}))
    with pytest.raises(compare.CompareError, match="no I/O"):
        compare.parse_bench_json(json.dumps({**base, "ios": 0}))
    with pytest.raises(compare.CompareError, match="p99"):
        compare.parse_bench_json(json.dumps({**base, "lat_us": {}}))


# -- console markers ----------------------------------------------------------------


def test_split_marked_finds_each_named_block() -> None:
    out = "x\n@@FIO a begin\n{1}\n@@FIO a end\nnoise\n@@FIO b begin\n{\n2}\n@@FIO b end\n"
    assert compare.split_marked(out, "FIO") == {"a": "{1}\n", "b": "{\n2}\n"}
    assert compare.split_marked("@@FIO a begin\n{1}\n@@FIO b end\n", "FIO") == {}


def test_cpu_marks_sample_at_start_and_end_markers() -> None:
    ticks = iter([100, 137, 200, 260])
    marks = compare.CpuMarks(4242, read=lambda pid: next(ticks))
    for line in ["booting", "@@JOB rr start", "noise @@JOBS", "@@JOB rr end",
                 "[ 5.0] kernel: @@JOB sw start", "@@JOB sw end"]:  # fmt: skip
        marks(line)
    assert marks.span("rr")[1] == 37
    assert marks.span("sw")[1] == 60
    assert marks.span("rr")[0] >= 0
    with pytest.raises(compare.CompareError, match="markers of job nope"):
        marks.span("nope")


def test_cpu_marks_without_a_process_time_only() -> None:
    marks = compare.CpuMarks(None, read=lambda pid: pytest.fail("no process to read"))
    marks("@@JOB a start")
    marks("@@JOB a end")
    assert marks.span("a")[1] is None


# -- /proc/PID/stat -----------------------------------------------------------------


def test_parse_proc_stat_counts_fields_after_the_command_name() -> None:
    rest = "S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15"
    assert compare.parse_proc_stat(f"77 (python3) {rest}\n") == 333
    # A command name may hold spaces and parentheses.
    assert compare.parse_proc_stat(f"77 (a) b (c) {rest}") == 333


@pytest.mark.parametrize("text", ["", "77 python3 S 1 2", "77 (x) S 1 2 3", "77 (x) " + "z " * 20])
def test_parse_proc_stat_rejects_garbage(text: str) -> None:
    with pytest.raises(compare.CompareError):
        compare.parse_proc_stat(text)


def test_cpu_ticks_of_a_busy_process_grow() -> None:
    before = compare.cpu_ticks(os.getpid())
    deadline = time.process_time() + 5
    while compare.cpu_ticks(os.getpid()) == before:
        assert time.process_time() < deadline, "5 s of CPU and /proc/PID/stat did not move"
        sum(range(10000))
    with pytest.raises(compare.CompareError, match="cannot read"):
        compare.cpu_ticks(2**22 + 7)  # above pid_max's ceiling


def test_cpu_us_per_io() -> None:
    assert compare.cpu_us_per_io(50, 100_000, clk_tck=100) == 5.0


# -- summaries, tables, chart --------------------------------------------------------


def test_median_ratio_rotated() -> None:
    assert compare.median([3.0, None, 1.0, 2.0]) == 2.0
    assert compare.median([None]) is None
    assert compare.ratio(3.0, 2.0) == 1.5
    assert compare.ratio(3.0, 0.0) is None and compare.ratio(None, 1.0) is None
    assert [compare.rotated("abc", k) for k in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]  # fmt: skip


def _sample(side: str, backend: str, job: str, q: int, rnd: int, iops: float) -> compare.Sample:
    cpu = None if backend == "qemu" else 10.0 * rnd
    return compare.Sample(side, backend, job, q, rnd, int(iops * 2), iops, iops * 4096 / 1e6,
                          900.0, 2.0, None if cpu is None else 7, cpu)  # fmt: skip


def _results(samples: list[compare.Sample], **settings: Any) -> dict[str, Any]:
    from dataclasses import asdict

    settings.setdefault("backends", list(BASE))
    s = compare.Settings(rounds=3, runtime=2, **settings)
    summary = compare.summarize(samples)
    return {
        "machine": {"date": "2025-01-02 03:04 UTC", "cpu_model": "Test CPU", "nproc": 2,
                    "kernel": "6.1", "qemu": "QEMU 7.2", "loadavg_start": "0.1 0.1 0.1",
                    "loadavg_end": "0.2 0.2 0.2"},
        "settings": asdict(s),
        "summary": summary,
        "ratios": compare.ratios(summary),
        "samples": [asdict(x) for x in samples],
        "notes": compare.notes(s, samples),
    }  # fmt: skip


#: The raw-file rows; the qcow2 and nbd rows have their own pairs.
BASE = ("vblk", "vblk-cache", "qsd", "qsd-cache", "qemu")


def _full_samples() -> list[compare.Sample]:
    out = []
    for rnd in (1, 2, 3):
        for q in (1, 2):
            for job in compare.JOBS:
                for b, base in (("vblk", 2000), ("vblk-cache", 2500), ("qsd", 1000),
                                ("qsd-cache", 1250), ("qemu", 1500)):  # fmt: skip
                    out.append(_sample("guest", b, job, q, rnd, base * q + rnd))
            for job in compare.DEVICE_JOBS:
                for b, base in (("vblk", 9000), ("vblk-cache", 12000), ("qsd", 10000),
                                ("qsd-cache", 11000)):  # fmt: skip
                    out.append(_sample("device", b, job, q, rnd, base + rnd))
    return out


def test_summarize_takes_medians_and_ratios_divide_vblk_by_qsd() -> None:
    summary = compare.summarize(_full_samples())
    row = next(r for r in summary if (r["side"], r["job"], r["queues"], r["backend"]) ==
               ("guest", "randread", 2, "vblk"))  # fmt: skip
    assert row["iops"] == 4002 and row["rounds"] == 3
    assert (row["iops_min"], row["iops_max"]) == (4001, 4003)
    assert row["cpu_us_per_io"] == 20.0
    qemu = next(r for r in summary if r["backend"] == "qemu")
    assert qemu["cpu_us_per_io"] is None
    rat = compare.ratios(summary)
    assert len(rat) == 2 * (2 * 4 + 2 * 2)  # per vblk variant: guest and device jobs x queues
    key = ("guest", "randread", 2, "vblk")
    r = next(x for x in rat if (x["side"], x["job"], x["queues"], x["backend"]) == key)
    assert r["iops"] == pytest.approx(4002 / 2002)
    assert r["cpu_us_per_io"] == 1.0
    key = ("device", "randread", 1, "vblk-cache")
    r = next(x for x in rat if (x["side"], x["job"], x["queues"], x["backend"]) == key)
    assert r["iops"] == pytest.approx(12002 / 11002)  # like for like: against qsd-cache


def test_markdown_has_every_row_and_column() -> None:
    md = compare.render_markdown(_results(_full_samples()))
    assert (
        "| job | queues | vblk serve --direct | vblk serve (page cache) | qemu-storage-daemon "
        "| qsd (page cache) | QEMU virtio-blk | vblk / qsd | vblk (cache) / qsd (cache) |" in md
    )
    assert "| 4k randread QD32 | 2 | 4,002 | 5,002 | 2,002 | 2,502 | 3,002 | 2.00 | 2.00 |" in md
    assert "| 1M seq write QD8 | 1 |" in md
    assert "**Backend CPU µs per I/O, guest fio**" in md
    assert "**`vblk bench` (no VM) IOPS**" in md
    assert "| 4k randwrite QD32 | 1 | 9,002 | 12,002 | 10,002 | 11,002 | 0.90 | 1.09 |" in md
    assert "2025-01-02 03:04 UTC on Test CPU (2 CPUs)" in md
    assert "10 ms ticks" in md or f"{1000 // compare.CLK_TCK} ms ticks" in md


def test_markdown_without_qsd_has_no_ratio_column() -> None:
    samples = [x for x in _full_samples() if x.backend != "qsd"]
    md = compare.render_markdown(_results(samples, backends=["vblk", "qemu"]))
    assert "vblk / qsd" not in md
    assert "| job | queues | vblk serve --direct | QEMU virtio-blk |" in md


def test_notes_give_the_round_to_round_spread() -> None:
    s = compare.Settings()
    note = next(n for n in compare.notes(s, _full_samples()) if n.startswith("Rounds disagreed"))
    # Every figure's rounds are n+1, n+2, n+3: the smallest n (qsd, 1 queue, 1001) is widest.
    assert "up to 0% (qemu-storage-daemon, guest 4k randread QD32, 1 queue)" in note
    wide = [*_full_samples(), _sample("device", "qsd", "randwrite", 2, 4, 30000)]
    assert "up to 200% (qemu-storage-daemon, device 4k randwrite QD32, 2 queues)" in next(
        n for n in compare.notes(s, wide) if n.startswith("Rounds")
    )
    one_round = [x for x in _full_samples() if x.round == 1]
    assert not any(n.startswith("Rounds") for n in compare.notes(s, one_round))


def test_render_redraws_the_reports_from_results_json(tmp_path: Path) -> None:
    src = tmp_path / "src" / "results.json"
    src.parent.mkdir()
    results = _results(_full_samples())
    results["notes"] = ["stale"]
    src.write_text(json.dumps(results))
    assert compare.main(["--render", str(src), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| 4k randread QD32 | 2 | 4,002 | 5,002 | 2,002 | 2,502 | 3,002 | 2.00 | 2.00 |" in md
    assert "stale" not in md and "Rounds disagreed" in md
    assert (tmp_path / "out" / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    (tmp_path / "bad.json").write_text('{"settings": {}}')
    assert compare.main(["--render", str(tmp_path / "bad.json"), "--out", str(tmp_path)]) == 1


def test_chart_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    compare.render_chart(_results(_full_samples()), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


# -- the pieces the guest runs -------------------------------------------------------


def test_guest_workload_marks_each_job_and_splits_the_region_per_queue() -> None:
    s = compare.Settings(runtime=3, span=64 << 20)
    text = compare.guest_workload(2, s)
    for name in compare.JOBS:
        assert text.index(f"@@JOB {name} start") < text.index(f"@@JOB {name} end")
        assert f"@@FIO {name} begin" in text
    assert "--numjobs=2" in text and "--cpus_allowed=0-1" in text
    assert f"--size={32 << 20} --offset_increment={32 << 20}" in text
    assert "--runtime=3 " in text and "--direct=1" in text and "--ioengine=libaio" in text
    assert "--cpus_allowed=0 " in compare.guest_workload(1, s)


def test_backend_commands_are_the_documented_ones(tmp_path: Path) -> None:
    s = compare.Settings(vblk_args=["--direct"])
    img, sock = tmp_path / "d.img", tmp_path / "s"
    v = compare.backend_command("vblk", img, sock, 2, s)
    assert v[1:] == ["-m", "vblk", "serve", str(img), "--socket", str(sock),
                     "--num-queues", "2", "--direct"]  # fmt: skip
    c = compare.backend_command("vblk-cache", img, sock, 2, s)
    assert c == v[:-1]  # the same serve, on the page cache
    q = " ".join(compare.backend_command("qsd", img, sock, 1, s))
    assert "cache.direct=on,aio=io_uring" in q and "num-queues=1" in q
    qc = " ".join(compare.backend_command("qsd-cache", img, sock, 1, s))
    assert qc == q.replace("cache.direct=on", "cache.direct=off")
    vq = compare.backend_command("vblk-qcow2", img, sock, 2, s)
    assert vq[4] == str(tmp_path / "d.qcow2") and "--direct" not in vq
    assert " --opt cache=none --opt aio=io_uring" in " ".join(vq)
    assert "driver=qcow2" in " ".join(compare.backend_command("qsd-qcow2", img, sock, 1, s))
    nbd = str(compare.nbd_socket(img))
    assert compare.backend_command("vblk-nbd", img, sock, 2, s)[4] == f"nbd+unix:///?socket={nbd}"
    assert f"driver=nbd,node-name=disk,server.type=unix,server.path={nbd}" in " ".join(
        compare.backend_command("qsd-nbd", img, sock, 1, s)
    )
    assert compare.nbd_server_command(img)[-3:] == ["--socket", nbd, str(img)]
    with pytest.raises(ValueError):
        compare.backend_command("qemu", img, sock, 1, s)


def test_plan_rotates_backends_each_round() -> None:
    s = compare.Settings(rounds=3, queues=[1, 2])
    steps = compare.Runner(s, Path("/nonexistent"), Path("/nonexistent")).plan()
    guest = [(r, b, q) for r, side, b, q in steps if side == "guest"]
    device = [(r, b, q) for r, side, b, q in steps if side == "device"]
    n = len(compare.BACKENDS)
    assert len(guest) == 3 * n * 2 and len(device) == 3 * (n - 1) * 2
    firsts = [next(b for rr, b, q in guest if rr == r) for r in range(3)]
    assert firsts == ["vblk", "vblk-cache", "qsd"]
    assert {b for _, b, _ in device} == {b for b in compare.DEVICE_BACKENDS if b in s.backends}
    # --quick: the qcow2 and nbd rows on one queue count, guest side only.
    quick = compare.Runner(compare.parse_args(["--quick"]).settings, Path("/x"), Path("/x"))
    storage = [(side, q) for _, side, b, q in quick.plan() if b in compare.STORAGE_BACKENDS]
    assert storage and set(storage) == {("guest", 1)}


def test_args_quick_defaults_and_errors() -> None:
    o = compare.parse_args(["--quick", "--out", "/x"])
    s = o.settings
    assert (s.rounds, s.runtime, s.span, s.quick, o.out) == (1, 2, 64 << 20, True, Path("/x"))
    assert s.backends == list(compare.BACKENDS) and s.queues == [1, 2] and o.render is None
    assert compare.BACKENDS[:5] == ("vblk", "vblk-cache", "qsd", "qsd-cache", "qemu")
    s = compare.parse_args(["--quick", "--runtime", "5", "--vblk-args", ""]).settings
    assert s.runtime == 5 and s.vblk_args == []
    for bad in (["--backends", "spdk"], ["--jobs", "randtrim"], ["--queues", "x"],
                ["--rounds", "0"], ["--span", "4096"]):  # fmt: skip
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


def test_image_is_filled_where_fio_reads_and_sparse_beyond(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    compare.make_image(img, 64 << 20, 3 << 20)
    assert img.stat().st_size == 64 << 20
    with open(img, "rb") as f:
        head = f.read(3 << 20)
        tail = f.read()
    assert all(any(head[o : o + 4096]) for o in range(0, len(head), 4096))
    assert not any(tail)
    assert img.stat().st_blocks * 512 < 16 << 20


# -- the whole tool -------------------------------------------------------------------


@pytest.mark.e2e
def test_quick_run_produces_complete_results(tmp_path: Path) -> None:
    """bench/compare.py --quick: every backend x job on 2 queues, CPU figures, vblk bench,
    and all three outputs (no timing asserts). One queue count keeps CI short; the plan
    over several counts is test_plan_rotates_backends_each_round's."""
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "fio"):
        _need(tool)
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--queues", "2",
         "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, f"stderr:\n{p.stderr[-4000:]}"
    assert "step 1/" in p.stderr and "fio randread ..." in p.stderr  # progress on stderr

    res = json.loads((out / "results.json").read_text())
    rows = {(r["side"], r["job"], r["queues"], r["backend"]): r for r in res["summary"]}
    for q in (2,):
        for job in compare.JOBS:
            for b in compare.BACKENDS:
                r = rows[("guest", job, q, b)]
                assert r["iops"] > 0 and r["mb_s"] > 0, r
                if b in compare.CPU_BACKENDS:
                    assert r["cpu_us_per_io"] is not None and r["cpu_us_per_io"] >= 0, r
                else:
                    assert r["cpu_us_per_io"] is None
        for job in compare.DEVICE_JOBS:
            for b in compare.DEVICE_BACKENDS:
                if b in compare.STORAGE_BACKENDS or b not in compare.BACKENDS:
                    continue  # guest side only, or an --rbd row
                r = rows[("device", job, q, b)]
                assert r["iops"] > 0 and r["p99_us"] > 0 and r["cpu_us_per_io"] is not None, r
    # Over a whole job the backend cannot have used no CPU at all.
    assert any(s["cpu_ticks"] for s in res["samples"] if s["backend"] == "vblk")
    assert any(s["cpu_ticks"] for s in res["samples"] if s["backend"] == "qsd")
    rat = {(r["side"], r["job"], r["queues"], r["backend"]): r for r in res["ratios"]}
    # raw pairs: guest and device; qcow2 and nbd pairs: guest only.
    assert len(rat) == 2 * (len(compare.JOBS) + len(compare.DEVICE_JOBS)) + 2 * len(compare.JOBS)
    assert not any(q == 1 for _, _, q, _ in rows), "--queues 2 ran a 1-queue step"
    assert all(r["iops"] and r["iops"] > 0 for r in rat.values())
    m = res["machine"]
    assert m["nproc"] and m["kernel"] and "QEMU" in m["qemu"] and m["date"]
    assert "vblk serve" in res["commands"]["backends"]["vblk q2"]
    assert "aio=io_uring" in res["commands"]["guest_qemu"]["qemu q2"]
    assert "vhost-user-blk-pci" in res["commands"]["guest_qemu"]["qsd q2"]

    md = (out / "results.md").read_text()
    assert (
        "| job | queues | vblk serve --direct | vblk serve (page cache) | qemu-storage-daemon "
        "| qsd (page cache) | QEMU virtio-blk | vblk serve qcow2 | qsd qcow2 | vblk serve nbd "
        "| qsd nbd | vblk / qsd | vblk (cache) / qsd (cache) | qcow2: vblk / qsd "
        "| nbd: vblk / qsd |" in md
    )
    for job in compare.JOBS.values():
        assert f"| {job.title} | 2 |" in md
    assert (out / "results.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.glob("vblk-compare-*")), "the work directory was left behind"
