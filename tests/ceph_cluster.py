"""A throwaway single-node Ceph cluster for tests and demos: 1 mon, 1 mgr, 1 memstore OSD.

Everything lives in one temporary directory (config, keyrings, logs, daemon
data) and the monitor listens on a free loopback port, so several clusters
(one per test session, one per demo) never meet. Authentication is off
(``auth_*_required = none``): the cluster is reachable from 127.0.0.1 only
and lives for minutes; ``start(cephx=True)`` turns cephx on, for tests of
credentials (client.admin's key is in ``DIR/keyring``, which the conf names).
The OSD keeps objects in RAM (memstore), capped by ``memstore_device_bytes``.
Daemons run in the foreground as our children and are stopped by their PIDs.

Used by the ``ceph`` pytest fixture (tests/conftest.py), ``make ceph-demo``
and ``make compare``; ``python tests/ceph_cluster.py`` starts one and waits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

POOL = "rbd"
STORE_BYTES = 3 << 30
START_TIMEOUT = 90.0

_CONF = """\
[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{port}
ms_bind_msgr1 = false
ms_bind_ipv4 = true
public_addr = 127.0.0.1
auth_cluster_required = {auth}
auth_service_required = {auth}
auth_client_required = {auth}
keyring = {dir}/keyring
run_dir = {dir}/run
log_file = {dir}/log/$name.log
admin_socket = {dir}/run/$name.asok
pid_file = {dir}/run/$name.pid
crash_dir = {dir}/crash
mon_data = {dir}/mon/$cluster-$id
osd_data = {dir}/osd/$cluster-$id
mgr_data = {dir}/mgr/$cluster-$id
osd_objectstore = memstore
memstore_device_bytes = {store}
memstore_page_set = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_osd_down_out_interval = 0
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_memory_target = 536870912
osd_max_object_name_len = 460
osd_max_object_namespace_len = 64
osd_heartbeat_grace = 60
osd_fast_shutdown = false
osd_client_watch_timeout = 5
mgr_stats_period = 30
ms_async_op_threads = 2
debug_ms = 0
debug_osd = 0
debug_mon = 0
debug_mgr = 0
[osd]
keyring = $osd_data/keyring
[mgr]
keyring = $mgr_data/keyring
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class CephCluster:
    """A running cluster; ``conf`` is the ceph.conf clients pass (``--opt conf=...``, ``-c``)."""

    dir: Path
    port: int
    pool: str = POOL
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.dir / "ceph.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for ceph/rbd CLIs and vblk: CEPH_CONF points at this cluster."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> str:
        """Run a ceph CLI (``rbd``, ``rados``, ``ceph``) against this cluster; its stdout."""
        proc = subprocess.run(
            [*argv[:1], "-c", str(self.conf), *argv[1:]],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout.decode(errors="replace")

    def mon_command(self, **cmd: object) -> str:
        """One monitor command through librados (much faster than the ``ceph`` CLI)."""
        import rados

        with rados.Rados(conffile=str(self.conf), conf={"client_mount_timeout": "30"}) as r:
            ret, out, err = r.mon_command(json.dumps(cmd), b"", timeout=30)
            if ret < 0:
                raise RuntimeError(f"{cmd['prefix']}: {err or os.strerror(-ret)}")
            return bytes(out).decode(errors="replace")

    def create_image(self, name: str, size: int, features: int | None = None) -> str:
        """A fresh image (default features: exclusive-lock, object-map...); ``POOL/NAME``."""
        import rados
        import rbd

        with rados.Rados(conffile=str(self.conf)) as r, r.open_ioctx(self.pool) as io:
            rbd.RBD().create(io, name, size, old_format=False, features=features)
        return f"{self.pool}/{name}"

    def snapshot(self, name: str, snap: str) -> str:
        """Snapshot an image; returns ``POOL/NAME@SNAP``."""
        import rados
        import rbd

        with rados.Rados(conffile=str(self.conf)) as r, r.open_ioctx(self.pool) as io:
            with rbd.Image(io, name) as img:
                img.create_snap(snap)
        return f"{self.pool}/{name}@{snap}"

    def remove_image(self, name: str) -> None:
        import rados
        import rbd

        with rados.Rados(conffile=str(self.conf)) as r, r.open_ioctx(self.pool) as io:
            rbd.RBD().remove(io, name)

    def export(self, name: str, dest: Path) -> Path:
        """``rbd export POOL/NAME DEST``: the image's bytes as the cluster has them."""
        dest.unlink(missing_ok=True)
        self.run("rbd", "export", "--no-progress", f"{self.pool}/{name}", str(dest), timeout=120)
        return dest

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Read a range of an image through librbd (for checks without a whole export)."""
        import rados
        import rbd

        with rados.Rados(conffile=str(self.conf)) as r, r.open_ioctx(self.pool) as io:
            with rbd.Image(io, name, read_only=True) as img:
                data: bytes = img.read(offset, length)
                return data

    def stop_osd(self) -> None:
        """Stop the OSD (I/O then waits or times out); :meth:`start_osd` brings it back."""
        _stop(self.procs.pop("osd.0"))

    def start_osd(self) -> None:
        self.procs["osd.0"] = self._daemon("ceph-osd", "-i", "0")

    def stop(self) -> None:
        """Stop every daemon by its PID and remove the directory."""
        for name in ("mgr.x", "osd.0", "mon.a"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _stop(proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _daemon(self, exe: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [exe, "-f", "-c", str(self.conf), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "log" / f"{exe}.stderr", "ab"),
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check(argv: list[str], **kw: object) -> None:
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")


def _log_tail(cluster: CephCluster) -> str:
    tails = []
    for log in sorted((cluster.dir / "log").glob("*")):
        lines = log.read_text(errors="replace").splitlines()[-5:]
        tails.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(tails)


def start(
    base: Path | None = None,
    pool: str = POOL,
    store_bytes: int = STORE_BYTES,
    cephx: bool = False,
) -> CephCluster:
    """Create and start a cluster with one pool for RBD; stop it with :meth:`CephCluster.stop`."""
    for exe in ("ceph-mon", "ceph-osd", "ceph-mgr", "monmaptool", "ceph-authtool"):
        if shutil.which(exe) is None:
            raise RuntimeError(f"{exe} not found (scripts/install-deps.sh installs ceph)")
    d = Path(tempfile.mkdtemp(prefix="vblk-ceph-", dir=base))
    cluster = CephCluster(dir=d, port=free_port(), pool=pool)
    try:
        _bootstrap(cluster, store_bytes, cephx)
    except BaseException as e:
        tail = _log_tail(cluster)
        cluster.stop()
        if isinstance(e, Exception):
            raise RuntimeError(f"ceph cluster did not start: {e}\n{tail}") from e
        raise
    return cluster


def _bootstrap(cluster: CephCluster, store_bytes: int, cephx: bool) -> None:
    d = cluster.dir
    for sub in ("run", "log", "crash", "mon/ceph-a", "osd/ceph-0", "mgr/ceph-x"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    auth = "cephx" if cephx else "none"
    conf = _CONF.format(fsid=fsid, port=cluster.port, dir=d, store=store_bytes, auth=auth)
    cluster.conf.write_text(conf)
    keyring = d / "keyring"
    kr = ["ceph-authtool", str(keyring)]
    _check([*kr, "--create-keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
    caps = ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"]
    _check([*kr, "--gen-key", "-n", "client.admin", *caps])
    monmap = d / "monmap"
    addr = f"[v2:127.0.0.1:{cluster.port}]"
    _check(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", addr, str(monmap)])
    mon = ["ceph-mon", "-c", str(cluster.conf), "-i", "a"]
    _check([*mon, "--mkfs", "--monmap", str(monmap), "--keyring", str(keyring)])
    cluster.procs["mon.a"] = cluster._daemon("ceph-mon", "-i", "a")

    deadline = time.monotonic() + START_TIMEOUT
    osd_uuid = str(uuid.uuid4())
    _retry(deadline, lambda: cluster.mon_command(prefix="osd new", uuid=osd_uuid, id=0), cluster)
    if cephx:
        _daemon_key(cluster, "osd.0", d / "osd/ceph-0/keyring", "mon", "allow profile osd",
                    "mgr", "allow profile osd", "osd", "allow *")  # fmt: skip
        _daemon_key(cluster, "mgr.x", d / "mgr/ceph-x/keyring", "mon", "allow profile mgr",
                    "osd", "allow *", "mds", "allow *")  # fmt: skip
    _check(["ceph-osd", "-c", str(cluster.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
    cluster.start_osd()
    cluster.procs["mgr.x"] = cluster._daemon("ceph-mgr", "-i", "x")
    cluster.mon_command(prefix="osd pool create", pool=cluster.pool, pg_num=8, pgp_num=8)
    cluster.mon_command(prefix="osd pool application enable", pool=cluster.pool, app="rbd")
    _retry(deadline, lambda: _probe(cluster), cluster)


def _daemon_key(cluster: CephCluster, entity: str, path: Path, *caps: str) -> None:
    """Create a daemon's key in the monitor and write its keyring where the conf says."""
    out = cluster.mon_command(prefix="auth get-or-create", entity=entity, caps=list(caps))
    path.write_text(out)


def _probe(cluster: CephCluster) -> None:
    """One object written and removed: the OSD is up and the pool's PGs are active."""
    import rados

    conf = {"rados_osd_op_timeout": "5", "client_mount_timeout": "10"}
    with rados.Rados(conffile=str(cluster.conf), conf=conf) as r, r.open_ioctx(cluster.pool) as io:
        io.write_full("vblk-probe", b"x")
        io.remove_object("vblk-probe")


def _retry(deadline: float, fn: object, cluster: CephCluster) -> None:
    assert callable(fn)
    while True:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}")
        try:
            fn()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def main() -> int:
    """Start a cluster, print its ceph.conf path and wait for Ctrl-C."""
    t0 = time.monotonic()
    cluster = start()
    took = time.monotonic() - t0
    print(f"ceph up in {took:.1f} s: CEPH_CONF={cluster.conf} pool={cluster.pool}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
