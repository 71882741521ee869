#!/usr/bin/env python3
"""Cairn dedup volumes over NBD vs native RBD, measured with fio on one throwaway Ceph cluster.

    .venv/bin/python bench/storage_vs_rbd.py [--size 1g] [--runtime 15] [--out FILE] [--only single|cluster]
                                             [--repeat N] [--quiet LOAD]

Brings up the test cluster (1 mon, 1 mgr, 3 OSDs, size 3), then in the same run:
1 MiB sequential write/read and 4 KiB random write/read, on unique and on 50 %
duplicate data, through ``cairn-nbd`` (fio's nbd engine) and through librbd (fio's rbd
engine). Prints each ratio (ours / RBD) and writes JSON. Beside each figure: where the
CPU went, per GiB moved (the Ceph daemons, fio, and cairn-nbd), for both sides: on a
machine with few cores the ratio is mostly the ratio of those totals. Also: stored bytes of 10
clones of one image after each "boots" (writes 2 MiB), vs the image alone; and the
time to snapshot a 1 GiB vs a 100 GiB volume.

Cluster run (several nodes = several ``cairn-storaged`` processes, each with its own
RADOS client, on the same pool): three writers on their own volumes at once vs three
fio/librbd clients at once (aggregate ratio); and the takeover time of a volume whose
owner was killed with -9 right after writing (lock break + journal replay + the first
read served by the new owner). The machine's load average is recorded beside each
figure: the machine is shared, so note it when comparing runs. ``--repeat 3 --quiet 1.0``
makes three runs (each on a fresh cluster), each started once the 1-minute load stayed
below 1.0 for 30 s (or after 20 minutes of waiting, which the result records), and
lists each figure's three ratios with the load before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.backends.rados_cluster import CephCluster, start_cluster  # noqa: E402
from storage.backends.rados_rbd import RbdVolumes  # noqa: E402
from storage.control import StorageClient  # noqa: E402
from storage.engine import open_pool  # noqa: E402
from storage.nbd import export_uri  # noqa: E402

WORKLOADS = [
    # name, rw, bs, iodepth, metric
    ("seq_write_1m", "write", "1m", 16, "bw"),
    ("seq_read_1m", "read", "1m", 16, "bw"),
    ("rand_write_4k", "randwrite", "4k", 32, "iops"),
    ("rand_read_4k", "randread", "4k", 32, "iops"),
]
TARGETS = {"seq_write_1m/dup50": 1.5, "seq_write_1m/unique": 0.8, "seq_read_1m/unique": 0.9,
           "rand_write_4k/unique": 1.5, "rand_read_4k/unique": 0.8}


def fio(engine_args: list[str], rw: str, bs: str, depth: int, size: str, runtime: int, dedupe: int,
        env: dict[str, str]) -> dict[str, Any]:
    argv = ["fio", "--name=b", *engine_args, f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
            f"--runtime={runtime}", "--output-format=json", "--refill_buffers", f"--dedupe_percentage={dedupe}",
            "--randrepeat=0"]
    if rw.startswith("rand"):
        argv.append("--time_based")
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=runtime * 4 + 120)
    if r.returncode != 0:
        raise SystemExit(f"fio failed: {r.stderr[-2000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"bw_mib_s": side["bw_bytes"] / (1 << 20), "iops": side["iops"], "io_bytes": side["io_bytes"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by the Ceph daemons, by finished child processes (fio) and by cairn-nbd
    between :meth:`start` and :meth:`per_gib`."""

    def __init__(self, cluster: CephCluster, nbd_pid: int) -> None:
        self.ceph = [p.pid for p in cluster.procs.values()]
        self.nbd = nbd_pid
        self.at = self._now()

    def _now(self) -> tuple[float, float, float]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (sum(cpu_seconds(p) for p in self.ceph), kids.ru_utime + kids.ru_stime, cpu_seconds(self.nbd))

    def start(self) -> None:
        self.at = self._now()

    def per_gib(self, io_bytes: int) -> dict[str, float]:
        """CPU seconds per GiB moved since :meth:`start`, by component."""
        now = self._now()
        gib = max(io_bytes, 1) / (1 << 30)
        ceph, fio_cpu, nbd = ((b - a) / gib for a, b in zip(self.at, now, strict=True))
        return {"ceph": round(ceph, 3), "fio": round(fio_cpu, 3), "nbd": round(nbd, 3),
                "total": round(ceph + fio_cpu + nbd, 3)}


def start_nbd(url: str, workdir: Path, volume: str, size: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(workdir / "nbd.sock")
    ready = workdir / "nbd.ready"
    ready.unlink(missing_ok=True)
    log = open(workdir / "nbd.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "storage.nbd.server", "--backend", url, "--socket", sock,
                             "--create", f"{volume}:{size}", "--ready-file", str(ready)], cwd=ROOT,
                            stdout=log, stderr=log)
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit((workdir / "nbd.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, sock


def run_pair(cluster: CephCluster, workdir: Path, args: argparse.Namespace, dedupe: int) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "CEPH_CONF": str(cluster.conf)}
    label = "dup50" if dedupe else "unique"
    rbd_vols = RbdVolumes(str(cluster.conf), cluster.pool)
    image = f"bench-{label}"
    rbd_vols.create(image, args.size_bytes)
    url = cluster.backend_url(f"bench-{label}")
    proc, sock = start_nbd(url, workdir, "bench", str(args.size_bytes))
    meter = CpuMeter(cluster, proc.pid)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, rw, bs, depth, metric in WORKLOADS:
            before = load()
            meter.start()
            ours = fio(["--ioengine=nbd", f"--uri={export_uri('bench', socket=sock)}"], rw, bs, depth, args.size,
                       args.runtime, dedupe, env)
            ours["cpu_s_per_gib"] = meter.per_gib(ours["io_bytes"])
            meter.start()
            theirs = fio(["--ioengine=rbd", "--clientname=admin", f"--pool={cluster.pool}", f"--rbdname={image}"],
                         rw, bs, depth, args.size, args.runtime, dedupe, env)
            theirs["cpu_s_per_gib"] = meter.per_gib(theirs["io_bytes"])
            key = "bw_mib_s" if metric == "bw" else "iops"
            ratio = ours[key] / theirs[key] if theirs[key] else 0.0
            results[f"{name}/{label}"] = {"ours": ours, "rbd": theirs, "metric": key, "ratio": ratio,
                                          "target": TARGETS.get(f"{name}/{label}"), "load_before": before,
                                          "load_after": load()}
            oc, tc = ours["cpu_s_per_gib"], theirs["cpu_s_per_gib"]
            print(f"{name:14} {label:6}  ours {ours[key]:10.1f}  rbd {theirs[key]:10.1f} {key:8}  "
                  f"ratio {ratio:5.2f}  (target {TARGETS.get(f'{name}/{label}', '-')}, load {before:.2f})\n"
                  f"{'':22}CPU s per GiB: ours {oc['total']:.2f} (ceph {oc['ceph']:.2f}, fio {oc['fio']:.2f}, "
                  f"cairn-nbd {oc['nbd']:.2f})  rbd {tc['total']:.2f} (ceph {tc['ceph']:.2f}, fio {tc['fio']:.2f})",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        rbd_vols.delete(image)
        rbd_vols.close()
    return results


def clones_and_snapshots(cluster: CephCluster) -> dict[str, float]:
    pool = open_pool(cluster.backend_url("bench-clones"))
    try:
        pool.create_volume("image", 512 << 20)
        img = pool.open_volume("image")
        for off in range(0, 512 << 20, 4 << 20):
            img.write(off, os.urandom(4 << 20))
        img.flush()
        pool.snapshot("image", "base")
        one = pool.stats()["stored_bytes"]
        for i in range(10):
            pool.clone("image", "base", f"vm{i}")
            vm = pool.open_volume(f"vm{i}")
            vm.write(i * (8 << 20), os.urandom(2 << 20))  # what a tiny guest boot writes: logs, machine-id, ...
            vm.flush()
        ten = pool.stats()["stored_bytes"]
        times = {}
        for name, size in (("snap_1g", 1 << 30), ("snap_100g", 100 << 30)):
            pool.create_volume(name, size)
            vol = pool.open_volume(name)
            vol.write(size - (1 << 20), os.urandom(1 << 20))
            vol.flush()
            t = time.perf_counter()
            pool.snapshot(name, "s")
            times[name] = time.perf_counter() - t
    finally:
        pool.close()
    out = {"stored_one_image": one, "stored_ten_clones_booted": ten, "clone_ratio": ten / one,
           "snapshot_1g_s": times["snap_1g"], "snapshot_100g_s": times["snap_100g"],
           "snapshot_time_ratio": times["snap_100g"] / times["snap_1g"]}
    print(f"10 booted clones / 1 image stored bytes: {out['clone_ratio']:.3f} (target <= 1.1)")
    print(f"snapshot 1 GiB {times['snap_1g'] * 1e3:.1f} ms, 100 GiB {times['snap_100g'] * 1e3:.1f} ms "
          f"(ratio {out['snapshot_time_ratio']:.2f}, target ~1)")
    return out


def load() -> float:
    """The 1-minute load average (the machine is shared: other sessions' work shows here)."""
    return os.getloadavg()[0]


class Node:
    """A ``cairn-storaged`` standing for one cluster node (its own RADOS client)."""

    def __init__(self, workdir: Path, name: str, url: str) -> None:
        self.name = name
        self.run_dir = workdir / f"node-{name}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / f"storaged-{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "storage.daemon", "--run-dir", str(self.run_dir),
                                      "--node", name], cwd=ROOT, stdout=log, stderr=log)
        self.client = StorageClient(self.run_dir / "storage.sock", timeout=600)
        deadline = time.monotonic() + 60
        while not self.client.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((workdir / f"storaged-{name}.log").read_text()[-2000:])
            time.sleep(0.05)
        self.client.call("attach", name="p", backend=url)
        self.socket = str(self.run_dir / "nbd-p.sock")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def parallel_fio(jobs: list[list[str]], rw: str, bs: str, depth: int, size: str, runtime: int,
                 env: dict[str, str]) -> float:
    """Run one fio per engine argument list at once; aggregate MiB/s."""
    procs = []
    for engine_args in jobs:
        argv = ["fio", "--name=b", *engine_args, f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
                f"--runtime={runtime}", "--output-format=json", "--refill_buffers", "--randrepeat=0"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=runtime * 6 + 300)
        if p.returncode != 0:
            raise SystemExit(f"fio failed: {err[-2000:]}")
        job = json.loads(out[out.index("{"):])["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        total += side["bw_bytes"] / (1 << 20)
    return total


def cluster_run(cluster: CephCluster, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Three nodes writing their own volumes at once vs three RBD clients; takeover time."""
    env = {**os.environ, "CEPH_CONF": str(cluster.conf)}
    url = cluster.backend_url("bench-cluster")
    nodes = [Node(workdir, f"n{i + 1}", url) for i in range(3)]
    rbd_vols = RbdVolumes(str(cluster.conf), cluster.pool)
    out: dict[str, Any] = {}
    try:
        for i, n in enumerate(nodes):
            n.client.call("create", pool="p", volume=f"w{i}", size=args.size_bytes)
            rbd_vols.create(f"bench-w{i}", args.size_bytes)
        for name, rw, bs, depth in (("seq_write_1m", "write", "1m", 16), ("seq_read_1m", "read", "1m", 16)):
            before = load()
            ours = parallel_fio([["--ioengine=nbd", f"--uri={export_uri(f'w{i}', socket=n.socket)}"]
                                 for i, n in enumerate(nodes)], rw, bs, depth, args.size, args.runtime, env)
            theirs = parallel_fio([["--ioengine=rbd", "--clientname=admin", f"--pool={cluster.pool}",
                                    f"--rbdname=bench-w{i}"] for i in range(3)], rw, bs, depth, args.size,
                                  args.runtime, env)
            out[f"three_writers/{name}"] = {"ours_mib_s": ours, "rbd_mib_s": theirs, "ratio": ours / theirs,
                                            "load_before": before, "load_after": load()}
            print(f"three nodes at once {name:12}  ours {ours:8.1f}  rbd {theirs:8.1f} MiB/s  "
                  f"ratio {ours / theirs:5.2f}  (load {before:.2f})", flush=True)
        out["takeover"] = takeover(nodes, workdir)
    finally:
        for n in nodes:
            n.stop()
        for i in range(3):
            rbd_vols.delete(f"bench-w{i}")
        rbd_vols.close()
    return out


def takeover(nodes: list[Node], workdir: Path) -> dict[str, float]:
    """Node 1 writes 128 MiB sequentially and 2,000 random 4 KiB blocks, flushes, is
    killed with -9 (no checkpoint since); node 2 takes the volume: fence + lock break +
    journal replay, then serves its first read."""
    n1, n2 = nodes[0], nodes[1]
    n1.client.call("create", pool="p", volume="t", size=1 << 30)
    uri = export_uri("t", socket=n1.socket)
    script = ["-c", "write -P 0x5a 0 128M"]
    for k in range(2000):  # random 4 KiB writes past the sequential part: patches on the journal
        script += ["-c", f"write -P 0x{k % 200 + 20:02x} {(256 << 20) + (k * 7919 % 16384) * 16384} 4k"]
    subprocess.run(["qemu-io", "-f", "raw", *script, "-c", "flush", uri], check=True, capture_output=True,
                   timeout=600)
    before = load()
    n1.kill()
    t0 = time.perf_counter()
    n2.client.call("take", pool="p", volume="t")
    t1 = time.perf_counter()
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 4k", export_uri("t", socket=n2.socket)],
                       capture_output=True, text=True, timeout=120)
    t2 = time.perf_counter()
    if r.returncode != 0 or "verification failed" in r.stdout.lower():
        raise SystemExit(f"the new owner read the wrong data: {r.stdout} {r.stderr}")
    res = {"lock_break_and_replay_s": t1 - t0, "first_read_s": t2 - t1, "total_s": t2 - t0, "load": before}
    print(f"takeover after kill -9: lock break + replay {res['lock_break_and_replay_s']:.2f} s, first read "
          f"{res['first_read_s']:.2f} s, total {res['total_s']:.2f} s (load {before:.2f})", flush=True)
    return res


def wait_for_quiet(below: float, hold: float = 30.0, give_up: float = 1200.0) -> dict[str, float]:
    """Wait until the 1-minute load average stayed below ``below`` for ``hold`` seconds
    (the machine is shared: other sessions' tests would be measured too); after
    ``give_up`` seconds run anyway. Returns what happened, for the result."""
    t0 = time.monotonic()
    quiet_since: float | None = None
    while True:
        now = time.monotonic()
        if load() < below:
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= hold:
                return {"waited_s": round(now - t0, 1), "quiet": True, "load": load()}
        else:
            quiet_since = None
        if now - t0 >= give_up:
            print(f"the load stayed above {below} for {give_up:.0f} s: running anyway (load {load():.2f})", flush=True)
            return {"waited_s": round(now - t0, 1), "quiet": False, "load": load()}
        time.sleep(2)


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Start a throwaway cluster, run the selected parts, stop it."""
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        cluster = start_cluster(work / "ceph", osd_size=16 << 30)
        print(f"ceph up in {time.time() - t0:.1f} s at {cluster.ip}", flush=True)
        try:
            results: dict[str, Any] = {"load_at_start": load()}
            if args.only in (None, "single"):
                for dedupe in (0, 50):
                    results.update(run_pair(cluster, work, args, dedupe))
                results["clones_and_snapshots"] = clones_and_snapshots(cluster)
            if args.only in (None, "cluster"):
                results["cluster"] = cluster_run(cluster, work, args)
            results["load_at_end"] = load()
        finally:
            cluster.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1g", help="fio region per job (default 1g)")
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "storage_vs_rbd.result.json"))
    ap.add_argument("--only", choices=("single", "cluster"), help="run one part only")
    ap.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh cluster (default 1)")
    ap.add_argument("--quiet", type=float, metavar="LOAD",
                    help="before each run wait until the 1-minute load stayed below LOAD for 30 s (at most 20 min)")
    args = ap.parse_args()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    args.size_bytes = int(args.size[:-1]) * units[args.size[-1].lower()]
    runs = []
    for n in range(args.repeat):
        waited = wait_for_quiet(args.quiet) if args.quiet is not None else None
        if args.repeat > 1:
            print(f"--- run {n + 1} of {args.repeat} (load {load():.2f})", flush=True)
        results = one_run(args)
        runs.append({"when": time.time(), "quiet_wait": waited, "results": results})
    out: dict[str, Any] = {"when": time.time(), "size": args.size, "runtime": args.runtime, "runs": runs}
    ratios = {k: [{"ratio": round(r["results"][k]["ratio"], 3), "load_before": round(r["results"][k]["load_before"], 2),
                   "load_after": round(r["results"][k]["load_after"], 2)} for r in runs]
              for k, v in runs[0]["results"].items() if isinstance(v, dict) and "ratio" in v}
    out["ratios"] = ratios
    for k, rs in ratios.items():
        each = "  ".join(f"{r['ratio']:5.2f} (load {r['load_before']:.2f}/{r['load_after']:.2f})" for r in rs)
        print(f"{k:22} {each}   target {TARGETS.get(k, '-')}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
