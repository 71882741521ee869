"""Pure builder: cloud-init NoCloud seed ISO (volume label ``cidata``) with pycdlib."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from compute.errors import InvalidCloudInit

USER_DATA_HEADERS = ("#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive")


@dataclass(frozen=True)
class CloudInitSeed:
    """The three NoCloud documents; ``network_config`` is optional (v2 YAML)."""

    instance_id: str
    hostname: str
    user_data: str = "#cloud-config\n{}\n"
    network_config: str | None = None


def _load_yaml(doc: str, what: str) -> Any:
    try:
        return yaml.safe_load(doc)
    except yaml.YAMLError as e:
        raise InvalidCloudInit(f"{what} is not valid YAML: {e}")


def validate_user_data(user_data: str) -> None:
    """Raise InvalidCloudInit unless ``user_data`` is a document cloud-init would accept.

    ``#cloud-config`` must be a YAML mapping; scripts (``#!``) and the other
    documented headers are passed through; anything else is rejected because
    cloud-init would silently ignore it.
    """
    first = user_data.split("\n", 1)[0].strip()
    if not first.startswith(USER_DATA_HEADERS):
        raise InvalidCloudInit(
            f"user-data must start with one of {', '.join(USER_DATA_HEADERS)}; got {first[:40]!r}"
        )
    if first.startswith("#cloud-config") and not first.startswith("#cloud-config-archive"):
        doc = _load_yaml(user_data, "user-data (#cloud-config)")
        if doc is not None and not isinstance(doc, dict):
            raise InvalidCloudInit(f"#cloud-config user-data must be a YAML mapping, got {type(doc).__name__}")


def validate_network_config(network_config: str) -> None:
    """Raise InvalidCloudInit unless ``network_config`` is a version 1 or 2 mapping."""
    doc = _load_yaml(network_config, "network-config")
    if not isinstance(doc, dict):
        raise InvalidCloudInit("network-config must be a YAML mapping")
    body = doc.get("network", doc)
    if not isinstance(body, dict) or body.get("version") not in (1, 2):
        raise InvalidCloudInit("network-config needs 'version: 1' or 'version: 2'")


def build_seed_iso(seed: CloudInitSeed) -> bytes:
    """Return the bytes of a NoCloud seed ISO for ``seed`` after validating its documents."""
    validate_user_data(seed.user_data)
    if seed.network_config is not None:
        validate_network_config(seed.network_config)
    meta = yaml.safe_dump({"instance-id": seed.instance_id, "local-hostname": seed.hostname}, sort_keys=True)
    files: list[tuple[str, str, bytes]] = [
        ("/USERDATA.;1", "user-data", seed.user_data.encode()),
        ("/METADATA.;1", "meta-data", meta.encode()),
    ]
    if seed.network_config is not None:
        files.append(("/NETWORKC.;1", "network-config", seed.network_config.encode()))
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for iso_path, name, data in files:
        iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def read_seed_iso(data: bytes) -> dict[str, str]:
    """Return {file name: text} of a seed ISO (Rock Ridge names); for tests and debugging."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    result: dict[str, str] = {}
    try:
        for child in iso.list_children(rr_path="/"):
            name = child.rock_ridge.name().decode() if child.rock_ridge else ""
            if child.is_file() and name:
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path="/" + name)
                result[name] = buf.getvalue().decode()
    finally:
        iso.close()
    return result


def write_seed_iso(seed: CloudInitSeed, path: str) -> str:
    """Build the seed ISO for ``seed`` and write it to ``path`` (atomically); return ``path``.
    ``path`` may lie in a directory an unprivileged QEMU owns: the file is written new,
    never through a link left in its place (it would make root write to a host file)."""
    data = build_seed_iso(seed)
    tmp = f"{path}.tmp"
    Path(tmp).unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
