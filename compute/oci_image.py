"""OCI image store: oci-layout tarballs unpacked once, layers shared between containers.

Each layer is unpacked to ``<root>/layers/<digest>/`` (overlayfs whiteouts
translated), so any number of containers stack the same read-only layers as
overlayfs lowerdirs with their own upperdir.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from compute.errors import ImageNotFound, InvalidSpec

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it."""

    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/"


@dataclass(frozen=True)
class Image:
    """An unpacked image: its read-only layer directories, lowest first, and its config."""

    layers: tuple[Path, ...]
    config: ImageConfig = field(default_factory=ImageConfig)


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.lstrip("./") if name.startswith("./") else name)
    if p.is_absolute() or ".." in p.parts:
        raise InvalidSpec(f"image layer member {name!r} escapes the root")
    return p


def _extract_layer(fileobj: IO[bytes], dest: Path) -> None:
    """Unpack one layer tar into ``dest``, turning OCI whiteouts into overlayfs ones."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for m in tar:
            rel = _safe_name(m.name)
            if not rel.parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            base = rel.name
            if base == OPAQUE:
                os.setxattr(target.parent, "trusted.overlay.opaque", b"y")
                continue
            if base.startswith(WHITEOUT):
                os.mknod(target.parent / base[len(WHITEOUT):], stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            if m.isdev():
                continue  # devices come from the runtime's /dev, never from images
            if m.islnk():
                link_src = dest / _safe_name(m.linkname)
                if target.exists() or target.is_symlink():
                    target.unlink()
                os.link(link_src, target)
                continue
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            tar.extract(m, dest, set_attrs=not m.issym())
            if not m.issym():
                os.chmod(target, m.mode & 0o7777)


class ImageStore:
    """Unpacks images under ``root``; safe to share between drivers of one node."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "layers").mkdir(parents=True, exist_ok=True)

    def resolve(self, image: str) -> Image:
        """Return the unpacked image for a tarball path, or a local rootfs directory as one layer."""
        path = Path(image)
        if path.is_dir():
            return Image(layers=(path,))
        if not path.is_file():
            raise ImageNotFound(f"image {image!r} not found (an oci-layout tarball or a rootfs directory)")
        try:
            return self._unpack(path)
        except (tarfile.TarError, KeyError, ValueError, json.JSONDecodeError, OSError) as e:
            raise ImageNotFound(f"image {image!r} is not a readable oci-layout tarball: {e}")

    def _unpack(self, archive: Path) -> Image:
        with tarfile.open(archive) as outer:
            names = set(outer.getnames())

            def member(name: str) -> IO[bytes]:
                # layouts are tarred both as "./index.json" and as "index.json"
                for candidate in (name, f"./{name}"):
                    if candidate in names:
                        f = outer.extractfile(candidate)
                        if f is not None:
                            return f
                raise KeyError(f"{name} is missing from the archive")

            def blob(digest: str) -> IO[bytes]:
                algo, hexd = digest.split(":", 1)
                return member(f"blobs/{algo}/{hexd}")

            def member_json(name: str) -> Any:
                return json.load(member(name))

            index = member_json("index.json")
            manifest = json.load(blob(index["manifests"][0]["digest"]))
            config = json.load(blob(manifest["config"]["digest"])).get("config", {}) or {}
            layers = []
            for desc in manifest["layers"]:
                digest = desc["digest"]
                dest = self.root / "layers" / digest.replace(":", "-")
                if not dest.exists():
                    self._unpack_layer(blob(digest), desc.get("mediaType", ""), digest, dest)
                layers.append(dest)
        env = tuple(tuple(e.split("=", 1)) for e in config.get("Env") or [] if "=" in e)
        return Image(
            layers=tuple(layers),
            config=ImageConfig(env=env, cmd=tuple(config.get("Cmd") or ()),
                               workdir=config.get("WorkingDir") or "/"),
        )

    def _unpack_layer(self, f: IO[bytes], media_type: str, digest: str, dest: Path) -> None:
        data = f.read()
        algo, hexd = digest.split(":", 1)
        if algo == "sha256" and hashlib.sha256(data).hexdigest() != hexd:
            raise ValueError(f"layer {digest} fails its checksum")
        if media_type.endswith("+gzip") or data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        tmp = Path(tempfile.mkdtemp(dir=self.root / "layers", prefix=".unpack-"))
        try:
            _extract_layer(io.BytesIO(data), tmp)
            tmp.chmod(0o755)
            tmp.rename(dest)  # atomic: a layer directory is either complete or absent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
