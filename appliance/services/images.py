"""Images: what instances boot from. A VM image is a kernel + initramfs for direct
boot (the tiny test guest) or a disk volume; a container image is an OCI archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.engine import session_scope
from appliance.db.models import Image, Instance, Project, Volume
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, pools, quotas, tasks, volumes
from appliance.services.auth import project_by_name
from appliance.services.principal import Principal
from appliance.services.scoped import ScopedKind
from storage import imageio
from storage.errors import StorageError

images: ScopedKind[Image] = ScopedKind(Image, "image", "`cairn get images` lists them")


def record(session: Session, project_id: str, name: str, spec: dict[str, Any]) -> Image:
    """Create or replace an image row (used by import tasks, which run as the system)."""
    row = session.scalar(select(Image).where(Image.project_id == project_id, Image.name == name))
    verb = "updated"
    if row is None:
        row = Image(name=name, project_id=project_id, spec=spec, status={"phase": "Available"})
        session.add(row)
        verb = "created"
    else:
        row.spec, row.generation = spec, row.generation + 1
    session.flush()
    project = session.scalar(select(Project.name).where(Project.id == project_id)) or ""
    events.record(session, "image", verb, images.public(row, project), project_id)
    return row


def resolve(session: Session, project_id: str, name: str, kind: str) -> Image:
    """The image an instance asks for, checked for kind and for its files."""
    row = session.scalar(select(Image).where(Image.project_id == project_id, Image.name == name))
    if row is None:
        raise NotFound(f"there is no image '{name}' in this project: `cairn get images` lists them "
                       "(`cairn image import-test-guest` provides a tiny one)")
    if row.spec.get("kind") != kind:
        raise InvalidInput(f"image '{name}' is a {row.spec.get('kind')} image, not a {kind} image")
    if row.spec.get("format") == "disk" and (row.status or {}).get("phase") != "Available":
        raise Conflict(f"image '{name}' is {(row.status or {}).get('phase')}: wait until it is Available")
    shared = row.spec.get("blobs", {})  # in a cluster: kept in Ceph, each node copies them when it needs them
    for key in ("kernel", "initrd", "archive"):
        if key in row.spec and row.spec[key] not in shared and not Path(row.spec[key]).exists():
            raise NotFound(f"image '{name}' is missing its {key} file {row.spec[key]}: import it again")
    return row


def import_test_guest(session: Session, principal: Principal, project: str, node: str) -> dict[str, Any]:
    """Queue building the tiny test guest (kernel + busybox initramfs) and a busybox
    OCI image on ``node``; they become the images 'tiny-guest' and 'busybox'."""
    proj = project_by_name(session, principal, project, "write")
    return tasks.create(session, "image.import_test_guest", {"project_id": proj.id}, queue=f"node.{node}",
                        principal=principal, project_id=proj.id, resource=("image", proj.id, "tiny-guest"))


def delete(session: Session, principal: Principal, project: str, name: str) -> None:
    _, proj = images.row(session, principal, project, name, "write")
    users = list(session.scalars(select(Instance.name).where(Instance.project_id == proj.id)
                                 .where(Instance.spec["image"].as_string() == name)))
    if users:
        raise Conflict(f"image '{name}' is used by {', '.join(users[:5])}: delete them first")
    row = images.delete(session, principal, project, name)
    vol = session.get(Volume, (row.spec or {}).get("volume_id", ""))
    if vol is not None:  # a disk image: its volume goes too (clones made from it are independent)
        session.flush()
        volumes.delete(session, principal, project, vol.name)


def upload_check(db_url: str, principal: Principal, project: str, name: str, pool: str | None,
                 storage_class: str = "dedup") -> None:
    """Before the bytes arrive: may the caller write there, is the name free, is the pool
    up (and on Ceph, for an ``rbd`` image), has the project any volume quota left?"""
    with session_scope(db_url) as session:
        proj = project_by_name(session, principal, project, "write")
        if session.scalar(select(Image.id).where(Image.project_id == proj.id, Image.name == name)):
            raise Conflict(f"an image named '{name}' already exists in project '{project}': pick another name")
        prow = pools.row(session, pool or "default")
        if storage_class == "rbd" and prow.spec.get("backend") != "rados":
            raise InvalidInput(f"class 'rbd' needs a Ceph pool; '{prow.name}' is {prow.spec.get('backend')}")
        volumes.queue_of(session, prow)
        quotas.charge(session, proj.id, volume_bytes=1)  # the real size is charged once it is known


def _shared_upload(path: Path, queue: str) -> dict[str, str]:
    """In a cluster the import may run on another node than the one the upload reached:
    the file goes into the cluster's image store, the importing node copies it from there."""
    from appliance import imagefiles
    from appliance.settings import get_settings

    settings = get_settings()
    if settings.cluster is None or queue == f"node.{settings.node_name}":
        return {}
    digest = imagefiles.publish(settings, [str(path)])[str(path)]
    path.unlink(missing_ok=True)
    return {"sha256": digest}


def upload_finish(db_url: str, principal: Principal, project: str, name: str, path: Path, fmt: str | None,
                  pool: str | None, storage_class: str = "dedup") -> dict[str, Any]:
    """The upload is on disk: check it with qemu-img (a corrupt or unsupported file is a
    422 and is deleted), then record the image + its volume and queue the import."""
    try:
        info = imageio.probe(path, fmt)
    except StorageError as exc:
        path.unlink(missing_ok=True)
        raise InvalidInput(f"{exc}: nothing was stored") from None
    try:
        with session_scope(db_url) as session:
            proj = project_by_name(session, principal, project, "write")
            prow = pools.row(session, pool or "default")
            queue = volumes.queue_of(session, prow)
            quotas.charge(session, proj.id, volume_bytes=info["virtual_size"])
            vol = volumes.volumes.create(session, principal, project, f"image-{name}",
                                         {"image": name, "pool": prow.name, "class": storage_class,
                                          "size_bytes": info["virtual_size"], "labels": {}},
                                         {"phase": "Importing"}, pool_id=prow.id,
                                         storage_class=storage_class, size=info["virtual_size"],
                                         task_state="importing")
            spec = {"kind": "vm", "format": "disk", "source_format": info["format"], "volume": vol.name,
                    "volume_id": vol.id, "snapshot": "base", "virtual_size": info["virtual_size"]}
            img = images.create(session, principal, project, name, spec, {"phase": "Importing"})
            params = {"image_id": img.id, "volume_id": vol.id, "path": str(path), "format": info["format"],
                      **_shared_upload(path, queue)}
            return tasks.create(session, "image.import", params,
                                queue=queue, principal=principal, project_id=proj.id,
                                resource=("image", img.id, name), max_attempts=1)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
