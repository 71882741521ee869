"""Build the installer ISO: Debian 12 + Cairn, everything inside, hybrid BIOS/UEFI.

The image is two zstd squashfs layers that live-boot stacks (``live/filesystem.module``)
and the installer unpacks in the same order onto the disk:

- ``base.squashfs``: Debian packages (``installer/image/packages.txt``) by mmdebstrap;
- ``cairn.squashfs``: ``/opt/cairn`` (a virtualenv built from the image's own
  ``/usr/bin/python3 --system-site-packages``, with a wheel of the project and all its
  dependencies installed offline, the console's built assets) and the systemd units.

Everything is cached under ``cache_dir`` (default ``/var/cache/cairn-installer``, or
``CAIRN_INSTALLER_CACHE``), each piece keyed on what it is made of:

| entry | key |
|---|---|
| ``debs/`` | apt's .deb cache, shared by every base build |
| ``base-<k>/`` | package list, suite, recipe → rootfs/ (for chroot work), base.squashfs, vmlinuz, initrd.img |
| ``wheels-<k>/`` | the project's dependency list and Python version → the dependency wheels |
| ``venv-<k>/`` | base + wheels → /opt/cairn/venv with the dependencies |
| ``layer-<k>/`` | venv + the project wheel's contents + console assets + units → cairn.squashfs |
| ``iso-<k>.iso`` | base + layer + boot menu |

so an unchanged rebuild only copies the ISO, and a code change rebuilds one small layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from installer.errors import BuildError
from installer.media import ISO_VOLUME_ID, LAYERS, iso_grub_cfg

RECIPE = "3"  # bump when a build step changes in a way the keys below cannot see
PROJECT_DIR = Path(__file__).resolve().parent.parent
IMAGE_DIR = Path(__file__).resolve().parent / "image"
DEFAULT_CACHE = Path(os.environ.get("CAIRN_INSTALLER_CACHE", "/var/cache/cairn-installer"))
MIRRORS = (
    "deb http://deb.debian.org/debian {suite} main",
    "deb http://deb.debian.org/debian {suite}-updates main",
    "deb http://deb.debian.org/debian-security {suite}-security main",
)
# Debian services whose packages the image carries for Cairn to run its own way (cluster
# formation configures and starts them); enabled as shipped, each would start unconfigured.
DISABLED_UNITS = ("redis-server.service", "redis-sentinel.service", "postgresql.service", "etcd.service",
                  "patroni.service", "prometheus.service")
# Kernel modules a server appliance never loads: sound cards, TV tuners and webcams.
DROPPED_MODULES = ("kernel/sound", "kernel/drivers/media")
KEEP = {"base": 2, "wheels": 2, "venv": 2, "layer": 3, "iso": 2}

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    iso: Path
    size: int
    cached: bool  # the whole ISO came from the cache
    seconds: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"iso": str(self.iso), "size": self.size, "cached": self.cached,
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()}, "keys": self.keys}


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree_digest(root: Path) -> str:
    """Content hash of a directory tree (names, modes and bytes; not times)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        if path.is_symlink():
            h.update(b"L" + os.readlink(path).encode())
        else:
            h.update(oct(path.stat().st_mode & 0o777).encode() + path.read_bytes())
    return h.hexdigest()[:16]


def wheel_digest(wheel: Path) -> str:
    """Hash of a wheel's members (names and bytes): zip timestamps do not change the key."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name))
    return h.hexdigest()[:16]


def read_package_list(path: Path = IMAGE_DIR / "packages.txt") -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def _project_dependencies(project_dir: Path) -> list[str]:
    return list(tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]["dependencies"])


class Builder:
    def __init__(self, project_dir: Path = PROJECT_DIR, cache_dir: Path = DEFAULT_CACHE, suite: str = "bookworm",
                 compression_level: int = 9, progress: Progress | None = None) -> None:
        self.project = project_dir
        self.cache = cache_dir
        self.suite = suite
        self.level = compression_level
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr))
        self.seconds: dict[str, float] = {}
        self.logs = cache_dir / "logs"

    # --- plumbing -------------------------------------------------------------------------

    def _run(self, argv: list[str], log: str, **kw: object) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{log}.log", "ab") as out:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
        if r.returncode != 0:
            tail = (self.logs / f"{log}.log").read_text(errors="replace").splitlines()[-25:]
            raise BuildError(f"{argv[0]} failed (exit {r.returncode}); log {self.logs / log}.log:\n"
                             + "\n".join(tail))

    @contextlib.contextmanager
    def _step(self, name: str, message: str) -> Iterator[None]:
        self.progress(message)
        t0 = time.monotonic()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0

    @contextlib.contextmanager
    def _entry(self, name: str) -> Iterator[Path]:
        """A cache entry made in a temporary directory and renamed into place when complete."""
        final = self.cache / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.cache))
        try:
            yield tmp
            tmp.rename(final)
        finally:
            if tmp.exists():
                _remove_tree(tmp)

    def _chroot(self, root: Path, script: str, log: str) -> None:
        """Run a shell script chrooted into ``root`` in a private mount namespace: the
        /dev and /proc mounts vanish with it, even if this process is killed."""
        inner = (f'set -e; mount --rbind /dev "{root}/dev"; mount -t proc proc "{root}/proc"; '
                 f'chroot "{root}" /bin/sh -ec \'{script}\'')
        self._run(["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", inner], log)

    def _squash(self, src: Path, dest: Path, log: str, exclude: tuple[str, ...] = ()) -> None:
        argv = ["mksquashfs", str(src), str(dest), "-comp", "zstd", "-Xcompression-level", str(self.level),
                "-b", "1M", "-noappend", "-no-progress", "-quiet"]
        if exclude:
            argv += ["-wildcards", "-e", *exclude]
        self._run(argv, log)

    def _prune(self, prefix: str, keep: int) -> None:
        entries = sorted(self.cache.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[keep:]:
            _remove_tree(old) if old.is_dir() else old.unlink()

    # --- the pieces ---------------------------------------------------------------------

    def project_wheel(self, dest: Path) -> Path:
        with self._step("wheel", "building the project wheel"):
            if not (self.project / "webui" / "dist" / "index.html").exists():
                raise BuildError(f"{self.project}/webui/dist is missing: build the console first "
                                 "(./bootstrap.sh install)")
            self._run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                       "-w", str(dest), str(self.project)], "wheel")
        wheels = sorted(dest.glob("cairn_hci-*.whl"))
        if not wheels:
            raise BuildError(f"pip wheel made no cairn_hci wheel in {dest}")
        return wheels[-1]

    def base_key(self) -> str:
        hooks = (IMAGE_DIR / "base-hooks.sh").read_text()
        return _digest(RECIPE, self.suite, "\n".join(sorted(read_package_list())), hooks, str(self.level),
                       " ".join(DISABLED_UNITS), " ".join(DROPPED_MODULES))

    def base(self) -> Path:
        """Debian root by mmdebstrap: kept unpacked (the venv is built in it) and squashed."""
        name = f"base-{self.base_key()}"
        if (self.cache / name / "base.squashfs").exists():
            self.progress(f"base image: cached ({name})")
            return self.cache / name
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        with self._entry(name) as out:
            root = out / "rootfs"
            with self._step("mmdebstrap", f"building the Debian root with mmdebstrap ({len(read_package_list())} "
                            "packages; a few minutes)"):
                self._run([
                    "mmdebstrap", "--mode=root", "--variant=minbase", "--include=" + ",".join(read_package_list()),
                    "--aptopt=Acquire::Retries \"3\"",
                    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/info/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                    "--skip=essential/unlink",
                    "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives",
                    f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
                    f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
                    f"--customize-hook=DISABLED_UNITS='{' '.join(DISABLED_UNITS)}' "
                    f"DROPPED_MODULES='{' '.join(DROPPED_MODULES)}' sh -e {IMAGE_DIR / 'base-hooks.sh'} \"$1\"",
                    self.suite, str(root), *(m.format(suite=self.suite) for m in MIRRORS),
                ], "mmdebstrap")
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            if len(kernels) != 1:
                raise BuildError(f"expected one kernel in the image, found {[k.name for k in kernels]}")
            version = kernels[0].name.removeprefix("vmlinuz-")
            shutil.copy2(kernels[0], out / "vmlinuz")
            shutil.copy2(root / "boot" / f"initrd.img-{version}", out / "initrd.img")
            with self._step("squash_base", f"packing the base layer (zstd level {self.level})"):
                self._squash(root, out / "base.squashfs", "squash-base",
                             exclude=("boot/vmlinuz-*", "boot/initrd.img-*", "opt/cairn"))
            pkgs = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"],
                                  capture_output=True, text=True, check=True).stdout
            (out / "packages.lock").write_text(pkgs)
            (out / "kernel").write_text(version + "\n")
        self._prune("base", KEEP["base"])
        return self.cache / name

    def wheels(self) -> Path:
        """The project's dependencies as wheels (from PyPI, once per dependency list)."""
        if sys.version_info[:2] != (3, 11):
            raise BuildError("build-iso runs with Debian 12's python3.11: the image's wheels must match it")
        deps = _project_dependencies(self.project)
        name = f"wheels-{_digest(RECIPE, sys.version, *deps)}"
        if (self.cache / name / "requirements.txt").exists():
            return self.cache / name
        with self._entry(name) as out, self._step("wheels", f"downloading {len(deps)} dependencies' wheels"):
            reqs = out / "requirements.in"
            reqs.write_text("\n".join(deps) + "\n")
            self._run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), "-r", str(reqs)], "wheels")
            (out / "requirements.txt").write_text("\n".join(deps) + "\n")
        self._prune("wheels", KEEP["wheels"])
        return self.cache / name

    def deps_venv(self, base: Path, wheels: Path) -> Path:
        """/opt/cairn/venv with every dependency, made by the image's python in the base root."""
        name = f"venv-{_digest(RECIPE, base.name, wheels.name)}"
        if (self.cache / name / "cairn" / "venv" / "bin" / "python").exists():
            return self.cache / name
        root = base / "rootfs"
        with self._entry(name) as out, self._step("venv", "installing the dependencies into the image's virtualenv"):
            _remove_tree(root / "opt" / "cairn")
            stage = root / "tmp" / "cairn-wheels"
            _remove_tree(stage)
            shutil.copytree(wheels, stage)
            try:
                self._chroot(root, "python3 -m venv --system-site-packages /opt/cairn/venv && "
                             "/opt/cairn/venv/bin/pip install -q --no-index --no-cache-dir "
                             "--find-links /tmp/cairn-wheels -r /tmp/cairn-wheels/requirements.txt", "venv")
                (root / "opt" / "cairn").rename(out / "cairn")
            finally:
                _remove_tree(stage)
                _remove_tree(root / "opt" / "cairn")
        self._prune("venv", KEEP["venv"])
        return self.cache / name

    def layer_inputs(self) -> dict[str, Path]:
        """What goes into the cairn layer besides the venv (hashed into its key)."""
        return {"units": self.project / "appliance" / "systemd", "overlay": IMAGE_DIR / "rootfs",
                "webui": self.project / "webui" / "dist"}

    def cairn_layer(self, base: Path, venv: Path, wheel: Path) -> Path:
        inputs = self.layer_inputs()
        name = "layer-" + _digest(RECIPE, venv.name, wheel_digest(wheel), str(self.level),
                                  *(f"{k}={_tree_digest(p)}" for k, p in sorted(inputs.items())))
        if (self.cache / name / "cairn.squashfs").exists():
            self.progress(f"cairn layer: cached ({name})")
            return self.cache / name
        root = base / "rootfs"
        with self._entry(name) as out:
            stage = out / "stage"
            with self._step("cairn_install", "installing the project wheel into the virtualenv"):
                _remove_tree(root / "opt" / "cairn")
                (root / "opt").mkdir(exist_ok=True)
                self._run(["cp", "-a", str(venv / "cairn"), str(root / "opt" / "cairn")], "layer")
                shutil.copy2(wheel, root / "tmp" / wheel.name)
                try:
                    self._chroot(root, f"/opt/cairn/venv/bin/pip install -q --no-index --no-deps --no-cache-dir "
                                 f"/tmp/{wheel.name}", "layer")
                    (stage / "opt").mkdir(parents=True)
                    (root / "opt" / "cairn").rename(stage / "opt" / "cairn")
                finally:
                    (root / "tmp" / wheel.name).unlink(missing_ok=True)
                    _remove_tree(root / "opt" / "cairn")
                shutil.copytree(inputs["webui"], stage / "opt" / "cairn" / "webui" / "dist")
                shutil.copytree(inputs["overlay"], stage, symlinks=True, dirs_exist_ok=True)
                install_units(inputs["units"], stage)
                install_units(inputs["overlay"] / "etc" / "systemd" / "system", stage, copy=False)
                for tool in ("cairn", "cairn-installer"):
                    link = stage / "usr" / "local" / "bin" / tool
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(f"/opt/cairn/venv/bin/{tool}")
                (stage / "etc" / "cairn").mkdir(parents=True, exist_ok=True)
                (stage / "etc" / "cairn" / "build.json").write_text(json.dumps(
                    {"wheel": wheel.name, "layer": name, "base": base.name, "kernel": (base / "kernel").read_text()
                     .strip(), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
            with self._step("squash_cairn", "packing the cairn layer"):
                self._squash(stage, out / "cairn.squashfs", "squash-cairn")
            _remove_tree(stage)
        self._prune("layer", KEEP["layer"])
        return self.cache / name

    def iso(self, base: Path, layer: Path) -> tuple[Path, bool]:
        cfg = iso_grub_cfg()
        name = f"iso-{_digest(RECIPE, base.name, layer.name, cfg)}.iso"
        final = self.cache / name
        if final.exists():
            self.progress(f"ISO: cached ({name})")
            return final, True
        with self._entry(name + ".d") as out, self._step("grub_mkrescue", "making the hybrid BIOS/UEFI ISO"):
            tree = out / "tree"
            live = tree / "live"
            live.mkdir(parents=True)
            for src, dest in ((base / "base.squashfs", LAYERS[0]), (layer / "cairn.squashfs", LAYERS[1]),
                              (base / "vmlinuz", "vmlinuz"), (base / "initrd.img", "initrd.img")):
                os.link(src, live / dest)
            (live / "filesystem.module").write_text("\n".join(LAYERS) + "\n")
            (tree / "boot" / "grub").mkdir(parents=True)
            (tree / "boot" / "grub" / "grub.cfg").write_text(cfg)
            (tree / "cairn").mkdir()
            (tree / "cairn" / "build.json").write_text(json.dumps({"iso": name, "base": base.name,
                                                                   "layer": layer.name}) + "\n")
            iso = out / "cairn.iso"
            self._run(["grub-mkrescue", "-o", str(iso), "--compress=xz", "--fonts=", "--locales=", "--themes=",
                       str(tree), "--", "-volid", ISO_VOLUME_ID], "grub-mkrescue")
            check_hybrid(iso)
            iso.rename(final)
        _remove_tree(self.cache / f"{name}.d")
        self._prune("iso", KEEP["iso"])
        return final, False

    def build(self, output: Path) -> BuildResult:
        self.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with _locked(self.cache / "lock"), tempfile.TemporaryDirectory(dir=self.cache, prefix=".wheel.") as tmp:
            wheel = self.project_wheel(Path(tmp))
            base = self.base()
            venv = self.deps_venv(base, self.wheels())
            layer = self.cairn_layer(base, venv, wheel)
            iso, cached = self.iso(base, layer)
            with self._step("copy", f"writing {output}"):
                output.parent.mkdir(parents=True, exist_ok=True)
                tmp_out = output.with_name(f".{output.name}.tmp")
                shutil.copyfile(iso, tmp_out)
                tmp_out.replace(output)
        self.seconds["total"] = time.monotonic() - t0
        return BuildResult(iso=output, size=output.stat().st_size, cached=cached, seconds=dict(self.seconds),
                           keys={"base": base.name, "venv": venv.name, "layer": layer.name, "iso": iso.name})


# Units the image ships disabled: the node's services start once first boot ran `cairn up`
# or `cairn cluster init|join`, which enable cairn.target (a cluster starts on fresh nodes).
NOT_ENABLED = ("cairn.target",)


def install_units(src: Path, stage: Path, copy: bool = True) -> list[str]:
    """Copy unit files into stage/etc/systemd/system and enable them the way `systemctl
    enable` would (a symlink in each WantedBy target's .wants directory), but those of
    NOT_ENABLED."""
    enabled = []
    system = stage / "etc" / "systemd" / "system"
    system.mkdir(parents=True, exist_ok=True)
    for unit in sorted(src.glob("*.service")) + sorted(src.glob("*.target")):
        if copy:
            shutil.copy2(unit, system / unit.name)
        if unit.name in NOT_ENABLED:
            continue
        for target in re.findall(r"^WantedBy=(.+)$", unit.read_text(), re.M):
            for t in target.split():
                wants = system / f"{t}.wants"
                wants.mkdir(exist_ok=True)
                link = wants / unit.name
                link.unlink(missing_ok=True)
                link.symlink_to(f"/etc/systemd/system/{unit.name}")
                enabled.append(unit.name)
    return enabled


def check_hybrid(iso: Path) -> None:
    """Both El Torito boot images must be there: grub-mkrescue silently leaves a platform
    out when its grub files are missing on the build host."""
    r = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"],
                       capture_output=True, text=True)
    report = r.stdout + r.stderr
    bios = re.search(r"El Torito boot img :\s+\d+\s+BIOS", report)
    uefi = re.search(r"El Torito boot img :\s+\d+\s+UEFI", report)
    if not (bios and uefi):
        raise BuildError(f"{iso} is not hybrid (BIOS {'ok' if bios else 'missing'}, UEFI "
                         f"{'ok' if uefi else 'missing'}): install grub-pc-bin and grub-efi-amd64-bin\n{report}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time per cache (a second one waits, then finds the cache warm)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
