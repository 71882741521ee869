"""Images: what instances boot from. A VM image is a kernel + initramfs for direct
boot (the tiny test guest) or a disk volume; a container image is an OCI archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.models import Image, Instance, Project
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, tasks
from appliance.services.auth import project_by_name
from appliance.services.principal import Principal
from appliance.services.scoped import ScopedKind

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
    for key in ("kernel", "initrd", "archive"):
        if key in row.spec and not Path(row.spec[key]).exists():
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
    images.delete(session, principal, project, name)
