#!/usr/bin/env python3
"""Cairn dedup volumes over NBD vs native RBD, measured with fio on one throwaway Ceph cluster.

    .venv/bin/python bench/storage_vs_rbd.py [--size 1g] [--runtime 15] [--out FILE]

Brings up the test cluster (1 mon, 1 mgr, 3 OSDs, size 3), then in the same run:
1 MiB sequential write/read and 4 KiB random write/read, on unique and on 50 %
duplicate data, through ``cairn-nbd`` (fio's nbd engine) and through librbd (fio's rbd
engine). Prints each ratio (ours / RBD) and writes JSON. Also: stored bytes of 10
clones of one image after each "boots" (writes 2 MiB), vs the image alone; and the
time to snapshot a 1 GiB vs a 100 GiB volume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.backends.rados_cluster import CephCluster, start_cluster  # noqa: E402
from storage.backends.rados_rbd import RbdVolumes  # noqa: E402
from storage.engine import open_pool  # noqa: E402
from storage.nbd import export_uri  # noqa: E402

WORKLOADS = [
    # name, rw, bs, iodepth, metric
    ("seq_write_1m", "write", "1m", 16, "bw"),
    ("seq_read_1m", "read", "1m", 16, "bw"),
    ("rand_write_4k", "randwrite", "4k", 32, "iops"),
    ("rand_read_4k", "randread", "4k", 32, "iops"),
]
TARGETS = {"seq_write_1m/dup50": 1.5, "seq_write_1m/unique": 0.8, "rand_write_4k/unique": 0.6,
           "rand_read_4k/unique": 0.6, "rand_write_4k/dup50": 0.6, "rand_read_4k/dup50": 0.6}


def fio(engine_args: list[str], rw: str, bs: str, depth: int, size: str, runtime: int, dedupe: int,
        env: dict[str, str]) -> dict[str, float]:
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
    return {"bw_mib_s": side["bw_bytes"] / (1 << 20), "iops": side["iops"]}


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


def run_pair(cluster: CephCluster, workdir: Path, args: argparse.Namespace, dedupe: int) -> dict[str, dict]:
    env = {**os.environ, "CEPH_CONF": str(cluster.conf)}
    label = "dup50" if dedupe else "unique"
    rbd_vols = RbdVolumes(str(cluster.conf), cluster.pool)
    image = f"bench-{label}"
    rbd_vols.create(image, args.size_bytes)
    url = cluster.backend_url(f"bench-{label}")
    proc, sock = start_nbd(url, workdir, "bench", str(args.size_bytes))
    results: dict[str, dict] = {}
    try:
        for name, rw, bs, depth, metric in WORKLOADS:
            ours = fio(["--ioengine=nbd", f"--uri={export_uri('bench', socket=sock)}"], rw, bs, depth, args.size,
                       args.runtime, dedupe, env)
            theirs = fio(["--ioengine=rbd", "--clientname=admin", f"--pool={cluster.pool}", f"--rbdname={image}"],
                         rw, bs, depth, args.size, args.runtime, dedupe, env)
            key = "bw_mib_s" if metric == "bw" else "iops"
            ratio = ours[key] / theirs[key] if theirs[key] else 0.0
            results[f"{name}/{label}"] = {"ours": ours, "rbd": theirs, "metric": key, "ratio": ratio,
                                          "target": TARGETS.get(f"{name}/{label}")}
            print(f"{name:14} {label:6}  ours {ours[key]:10.1f}  rbd {theirs[key]:10.1f} {key:8}  "
                  f"ratio {ratio:5.2f}  (target {TARGETS.get(f'{name}/{label}', '-')})", flush=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1g", help="fio region per job (default 1g)")
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "storage_vs_rbd.result.json"))
    args = ap.parse_args()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    args.size_bytes = int(args.size[:-1]) * units[args.size[-1].lower()]
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        cluster = start_cluster(work / "ceph", osd_size=16 << 30)
        print(f"ceph up in {time.time() - t0:.1f} s at {cluster.ip}", flush=True)
        try:
            results = {}
            for dedupe in (0, 50):
                results.update(run_pair(cluster, work, args, dedupe))
            results["clones_and_snapshots"] = clones_and_snapshots(cluster)
        finally:
            cluster.stop()
    Path(args.out).write_text(json.dumps({"when": time.time(), "size": args.size, "runtime": args.runtime,
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
