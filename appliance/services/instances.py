"""VMs and containers: one resource model and one flow (DESIGN.md, Compute).

API → service (validate, claim ``task_state`` with compare-and-swap, record a task)
→ worker (schedule with a reservation claim, ports, then desired state) → the
node's agent (defines / starts / stops with the compute driver and reports
``power_state``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from appliance.db.models import Instance, Node, PlacementGroup, Port, StoragePool, Volume
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.scheduler.placement import Request
from appliance.services import groups, images, networks, placement, quotas, redact, tasks
from appliance.services.auth import project_by_name
from appliance.services.groups import group_key
from appliance.services.placement import HOSTNAME_LABEL
from appliance.services.principal import Principal
from appliance.services.resources import rowcount
from appliance.services.scoped import ScopedKind
from appliance.services.units import GIB, parse_size
from compute.cloudinit import validate_user_data
from compute.errors import InvalidCloudInit


def _extra(row: Instance) -> dict[str, Any]:
    return {"vm_state": row.vm_state, "task_state": row.task_state, "power_state": row.power_state}


KINDS: dict[str, ScopedKind[Instance]] = {
    "vm": ScopedKind(Instance, "vm", "`cairn get vms` lists them", _extra, {"kind": "vm"}, redact.instance),
    "container": ScopedKind(Instance, "container", "`cairn get containers` lists them", _extra,
                            {"kind": "container"}, redact.instance),
}

# action -> (task_state while it runs, vm_states it may start from, desired power)
ACTIONS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "start": ("starting", ("stopped", "error"), "running"),
    "stop": ("stopping", ("active", "paused", "error"), "stopped"),
    "reboot": ("rebooting", ("active",), "running"),
    "pause": ("pausing", ("active",), "paused"),
    "resume": ("resuming", ("paused",), "running"),
}


def check_fits_somewhere(session: Session, cpu: float, memory: int) -> None:
    """Refuse at once what no node could ever run, naming the shortfall."""
    rows = session.execute(select(Node.cpu_capacity, Node.memory_capacity, Node.status)).all()
    max_cpu = max((float(r[0] or 0) for r in rows), default=0.0)
    max_mem = max((int(r[1] or 0) for r in rows), default=0)
    threads = max((int((r[2] or {}).get("inventory", {}).get("threads", 0)) for r in rows), default=0)
    if memory > max_mem:
        raise InvalidInput(f"asks for {memory / GIB:.2f} GiB of memory but the largest node has "
                           f"{max_mem / GIB:.2f} GiB allocatable: ask for less or add a bigger node")
    if threads and cpu > threads:
        raise InvalidInput(f"asks for {cpu:g} CPUs but the largest node has {threads} CPU threads")
    if not max_cpu:
        raise InvalidInput("there are no nodes to run it on: start a node agent first")


def check_volumes(session: Session, principal: Principal, kind: str, project: str, name: str,
                  spec: dict[str, Any], image: Any) -> None:
    """Volumes to attach must be Available, free and owned by no node (a node's storage
    daemon holds the lock of every volume its instances use); a disk image gets a root
    volume. dedup volumes attach over NBD, rbd ones through QEMU's own RBD driver."""
    from appliance.services import volumes  # volumes imports this module

    wanted = list(spec.get("volumes") or [])
    if len(set(wanted)) != len(wanted):
        raise InvalidInput("a volume is listed twice in volumes")
    for vol_name in wanted:
        vol, _ = volumes.volumes.row(session, principal, project, vol_name, "write")
        if (vol.status or {}).get("phase") != "Available" or vol.task_state:
            raise Conflict(f"volume '{vol_name}' is {(vol.status or {}).get('phase')} "
                           f"({vol.task_state or 'idle'}): it must be Available")
        owned = volumes.owner_conflict(session, vol)
        if owned:
            raise Conflict(owned)
        users = volumes.users_of(session, vol)
        if users:
            raise Conflict(f"volume '{vol_name}' is already attached to {', '.join(users)}")
    if image.spec.get("format") == "disk" and not spec.get("root_volume"):  # (a clone brings its own)
        root = f"{name}-root"[:63]
        if volumes.volumes.exists(session, principal, project, root):
            raise Conflict(f"a volume named '{root}' already exists: the VM's root volume needs that name")
        if spec.get("root_size") is not None:
            size = parse_size(spec["root_size"])
            if size < int(image.spec.get("virtual_size", 0)):
                raise InvalidInput(f"root_size {size} is smaller than image '{image.name}' "
                                   f"({image.spec.get('virtual_size')} bytes)")
    elif spec.get("root_size") is not None:
        raise InvalidInput(f"root_size applies to disk images; '{image.name}' is a {image.spec.get('format')} image")


def container_mounts(spec: dict[str, Any]) -> dict[str, Any]:
    """A container's ``volumes`` as given (``{volume, path, fs, readonly}`` each) become
    ``volumes`` (the names, as for VMs: what is attached) and ``mounts`` (where and how)."""
    given = list(spec.get("volumes") or [])
    if not all(isinstance(v, dict) for v in given):
        return spec
    mounts = [{"volume": v["volume"], "path": v["path"].rstrip("/") or "/", "fs": v.get("fs", "ext4"),
               "readonly": bool(v.get("readonly", False))} for v in given]
    for m in mounts:
        if m["path"] == "/" or ".." in m["path"].split("/"):
            raise InvalidInput(f"volume '{m['volume']}': mount path {m['path']!r} must be an absolute path "
                               "other than / without '..' (e.g. /var/lib/data)")
    paths = [m["path"] for m in mounts]
    if len(set(paths)) != len(paths):
        raise InvalidInput("two volumes are mounted at the same path")
    return {**spec, "volumes": [m["volume"] for m in mounts], "mounts": mounts}


def placement_request(session: Session, row: Instance, selector: bool = True, pinned: bool = True) -> Request:
    """What the scheduler must find room for: the instance's size and QoS, its placement
    group, and its node selector (``selector=False``: none, for an explicit target;
    ``pinned=False``: without a pin to one node's name, for a move off that node)."""
    spec = row.spec or {}
    group = group_of(session, row)
    labels = dict(spec.get("node_selector") or {}) if selector else {}
    if not pinned:
        labels.pop(HOSTNAME_LABEL, None)
    return Request(cpus=float(spec["cpu"]), memory_bytes=int(spec["memory_bytes"]),
                   qos=spec.get("qos_class", "burstable"),
                   group=group_key(row.project_id, group.name) if group else None,
                   group_policy=group.spec["policy"] if group else None,
                   node_selector=tuple(sorted(labels.items())))


def check_ha_eligible(session: Session, principal: Principal, project: str, spec: dict[str, Any],
                      image: Any) -> None:
    """An HA instance restarts on another node when its node dies: its disks must live on
    replicated storage, not on a pool kept on one node's own disks."""
    from appliance.services import volumes

    if not spec.get("ha"):
        return
    used = []
    for vol_name in spec.get("volumes") or []:
        vol, _ = volumes.volumes.row(session, principal, project, vol_name, "read")
        used.append((vol_name, vol.pool_id))
    if image.spec.get("format") == "disk":
        src = session.get(Volume, image.spec.get("volume_id", ""))
        if src is not None:
            used.append((f"the root volume cloned from image '{image.name}'", src.pool_id))
    for what, pool_id in used:
        pool = session.get(StoragePool, pool_id)
        if pool is not None and (pool.spec or {}).get("backend") == "local":
            raise Conflict(f"an HA instance keeps its disks on replicated storage: {what} is on pool "
                           f"'{pool.name}', kept on one node's own disks, and would be lost with that node "
                           "(use a volume of a Ceph pool, or leave ha off)")


def create(session: Session, principal: Principal, kind: str, project: str, name: str,
           spec: dict[str, Any]) -> dict[str, Any]:
    """Validate, record the instance (building / scheduling) and its create task."""
    spec = container_mounts(dict(spec)) if kind == "container" else dict(spec)
    spec["memory_bytes"] = parse_size(spec.pop("memory"))
    if kind == "vm" and spec["cpu"] != int(spec["cpu"]):
        raise InvalidInput(f"a VM needs a whole number of vCPUs, not {spec['cpu']}")
    if spec.get("placement_group"):
        groups.groups.row(session, principal, project, spec["placement_group"])
    for net in spec.get("networks", []):
        networks.networks.row(session, principal, project, net)
    for port in spec.get("ports", []):
        port_row, _ = networks.ports.row(session, principal, project, port)
        if (port_row.status or {}).get("instance"):
            raise Conflict(f"port '{port}' is already attached to {port_row.status['instance']}")
    proj = project_by_name(session, principal, project, "write")
    image = images.resolve(session, proj.id, spec["image"], kind)
    check_volumes(session, principal, kind, project, name, spec, image)
    check_ha_eligible(session, principal, project, spec, image)
    if spec.get("user_data") is not None:
        try:
            validate_user_data(spec["user_data"])
        except InvalidCloudInit as exc:
            raise InvalidInput(f"user_data: {exc}")
    check_fits_somewhere(session, float(spec["cpu"]), spec["memory_bytes"])
    root = 0
    if image.spec.get("format") == "disk" and not spec.get("root_volume"):  # its root volume, made by the task
        root = parse_size(spec["root_size"]) if spec.get("root_size") else int(image.spec.get("virtual_size", 0))
    quotas.charge(session, proj.id, instances=1, cpu=float(spec["cpu"]), memory_bytes=spec["memory_bytes"],
                  volume_bytes=root)
    # The node acts only once the create task has its volumes and ports ready.
    spec["initial_power"] = spec.pop("power", "running")
    spec["power"] = "pending"
    row = KINDS[kind].create(session, principal, project, name, spec, {}, vm_state="building",
                             task_state="scheduling")
    attach_volumes(session, principal, project, row)
    task = tasks.create(session, "instance.create", {"instance_id": row.id}, queue="cluster",
                        principal=principal, project_id=row.project_id, resource=(kind, row.id, name),
                        max_attempts=1)
    return task


def attach_volumes(session: Session, principal: Principal, project: str, row: Instance) -> None:
    """Claim the volumes the spec lists for this instance (see volumes.attach)."""
    from appliance.services import volumes

    for vol_name in (row.spec or {}).get("volumes") or []:
        vol, _ = volumes.volumes.row(session, principal, project, vol_name, "write")
        volumes.attach(session, vol, row)


def _claim(session: Session, row: Instance, task_state: str, from_states: tuple[str, ...] | None) -> None:
    """Compare-and-swap on task_state: two operations never run on one instance."""
    query = update(Instance).where(Instance.id == row.id, Instance.task_state.is_(None))
    if from_states is not None:
        query = query.where(Instance.vm_state.in_(from_states))
    if not rowcount(session.execute(query.values(task_state=task_state).execution_options(
            synchronize_session=False))):
        session.refresh(row)
        if row.task_state:
            raise Conflict(f"{row.kind} '{row.name}' is busy ({row.task_state}): wait for that task to end")
        raise Conflict(f"{row.kind} '{row.name}' is {row.vm_state}: cannot {task_state.removesuffix('ing')} it "
                       f"from that state")
    session.refresh(row)


def action(session: Session, principal: Principal, kind: str, project: str, name: str, verb: str,
           params: dict[str, Any] | None = None) -> dict[str, Any]:
    row, proj = KINDS[kind].row(session, principal, project, name, "write")
    task_state, from_states, power = ACTIONS[verb]
    if row.node_id is None and row.vm_state == "error" and row.task_state is None:
        reason = (row.status or {}).get("error") or "its create did not finish"
        raise Conflict(f"{kind} '{name}' is not placed on any node ({reason}): delete it and create it again")
    _claim(session, row, task_state, from_states)
    KINDS[kind].emit(session, row, proj.name, "updated")
    return tasks.create(session, "instance.action", {"instance_id": row.id, "action": verb, "power": power,
                                                     **(params or {})},
                        queue="cluster", principal=principal, project_id=row.project_id,
                        resource=(kind, row.id, name), max_attempts=1)


def delete(session: Session, principal: Principal, kind: str, project: str, name: str) -> dict[str, Any]:
    row, proj = KINDS[kind].row(session, principal, project, name, "write")
    _claim(session, row, "deleting", None)
    KINDS[kind].emit(session, row, proj.name, "updated")
    return tasks.create(session, "instance.delete", {"instance_id": row.id}, queue="cluster",
                        principal=principal, project_id=row.project_id, resource=(kind, row.id, name),
                        max_attempts=3)


def attached_ports(session: Session, instance: Instance) -> list[Port]:
    ids = [p["id"] for p in (instance.status or {}).get("ports", [])]
    return list(session.scalars(select(Port).where(Port.id.in_(ids)))) if ids else []


def release_placement(session: Session, row: Instance, project: str) -> None:
    """Give back what placing an instance took: its node reservation, the ports its
    create made (deleted) and the ports the user gave it (detached, they outlive it)."""
    system = Principal("system", "system", "admin")
    placement.release(session, row.id)
    owned = {p["id"] for p in (row.status or {}).get("ports", []) if p.get("owned")}
    for port in attached_ports(session, row):
        if port.id in owned:
            networks.delete_port(session, system, project, port.name)
        else:  # a port the user made: it outlives the instance, detached
            networks.ports.set_status(session, port, instance=None, phase="Detached")


def group_of(session: Session, instance: Instance) -> PlacementGroup | None:
    name = (instance.spec or {}).get("placement_group")
    if not name:
        return None
    return session.scalar(select(PlacementGroup).where(PlacementGroup.project_id == instance.project_id,
                                                       PlacementGroup.name == name))


def exec_(session: Session, principal: Principal, project: str, name: str, command: list[str],
          timeout: float, tty: bool = False) -> dict[str, Any]:
    """Run a command in a running container, on its node (a task on that node's queue)."""
    row, _ = KINDS["container"].row(session, principal, project, name, "write")
    if row.power_state != "running" or not row.node_id:
        raise Conflict(f"container '{name}' is {row.power_state}: exec needs it running")
    node = session.get(Node, row.node_id)
    assert node is not None
    return tasks.create(session, "container.exec", {"instance_id": row.id, "domain": row.status.get("domain"),
                                                    "command": command, "timeout": timeout, "tty": tty,
                                                    "isolation": (row.spec or {}).get("isolation", "container")},
                        queue=f"node.{node.name}", principal=principal, project_id=row.project_id,
                        resource=("container", row.id, name), max_attempts=1)


def migrate(session: Session, principal: Principal, kind: str, project: str, name: str, to: str) -> dict[str, Any]:
    """VMs move live (their disks are network storage); containers are restarted on
    the target node instead."""
    row, _ = KINDS[kind].row(session, principal, project, name, "write")
    target = session.scalar(select(Node).where(Node.name == to))
    if target is None:
        raise NotFound(f"there is no node named '{to}': `cairn get nodes` lists them")
    schedulable = (target.spec or {}).get("schedulable", True)
    if target.phase != "Ready" or not schedulable:
        state = target.phase if schedulable else f"{target.phase} and cordoned"
        raise Conflict(f"node '{to}' is {state}: pick a Ready, schedulable node")
    if row.node_id == target.id:
        raise Conflict(f"{kind} '{name}' already runs on '{to}'")
    source = session.get(Node, row.node_id) if row.node_id else None
    if source is None:
        raise Conflict(f"{kind} '{name}' is not placed on any node yet")
    _claim(session, row, "migrating", ("active",))
    mode = "live" if kind == "vm" else "restart"
    return tasks.create(session, "instance.migrate", {"instance_id": row.id, "to": to, "mode": mode},
                        queue=f"node.{source.name}", principal=principal, project_id=row.project_id,
                        resource=(kind, row.id, name), max_attempts=1)


def list_filtered(session: Session, principal: Principal, kind: str, project: str | None, limit: int,
                  cursor: str | None, search: str | None = None, state: str | None = None,
                  node: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of VMs or containers, filtered in the database: name contains ``search``,
    ``vm_state`` is ``state``, placed on ``node`` (the console's list with thousands)."""
    node_id: str | None = None
    if node:
        node_id = session.scalar(select(Node.id).where(Node.name == node)) or "-"  # unknown node: nothing
    return KINDS[kind].list_(session, principal, project, limit, cursor, search=search, vm_state=state,
                             node_id=node_id)


def counts(session: Session, principal: Principal) -> dict[str, dict[str, int]]:
    """VMs and containers the caller can see, by kind: ``total`` and per ``vm_state``
    (one GROUP BY, whatever their number)."""
    query = select(Instance.kind, Instance.vm_state, func.count()).group_by(Instance.kind, Instance.vm_state)
    visible = principal.readable_project_ids()
    if visible is not None:
        query = query.where(Instance.project_id.in_(visible))
    out: dict[str, dict[str, int]] = {"vm": {"total": 0}, "container": {"total": 0}}
    for kind, state, n in session.execute(query):
        bucket = out.setdefault(kind, {"total": 0})
        bucket[state] = bucket.get(state, 0) + n
        bucket["total"] += n
    return out
