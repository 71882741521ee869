"""Task handlers for VMs and containers: schedule → ports → define → start, and the
lifecycle actions. Workers only change desired state and wait; the node agent acts
(one writer per node, as in KubeVirt)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from appliance.db.engine import session_scope
from appliance.db.models import Claim, Instance, Network, Node, Project, Subnet, Task, Volume
from appliance.errors import CairnError
from appliance.services import images, instances, networks, placement, statuses, volumes
from appliance.services.principal import Principal
from appliance.settings import get_settings
from appliance.tasks.runner import TaskContext, handler

SYSTEM = Principal("system", "system", "admin")


class InstanceFailed(CairnError):
    status = 409
    title = "Instance operation failed"


def _load(ctx: TaskContext, instance_id: str) -> Instance:
    with session_scope(ctx.db_url) as session:
        row = session.get(Instance, instance_id)
        if row is None:
            raise InstanceFailed(f"instance {instance_id} no longer exists")
        session.expunge(row)
        return row


def _update(ctx: TaskContext, instance_id: str, status: statuses.StatusPatch | None = None,
            spec: dict[str, Any] | None = None, **columns: Any) -> None:
    """Change one instance (columns, a status patch, a spec merge that bumps the
    generation) under its row lock, with its event."""
    def merge_spec(row: Instance) -> None:
        if spec is not None:
            row.spec = {**row.spec, **spec}
            row.generation += 1

    with session_scope(ctx.db_url) as session:
        row = session.get(Instance, instance_id)
        if row is None:
            return
        instances.KINDS[row.kind].write_status(session, row, status, columns=columns, change=merge_spec)


def _wait_power(ctx: TaskContext, instance_id: str, want: str, start_pct: float, label: str) -> Instance:
    """Wait for the agent to report ``want`` (or an error), with progress."""
    timeout = get_settings().instance_start_timeout
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        row = _load(ctx, instance_id)
        if row.power_state == want and row.observed_generation >= row.generation:
            return row
        if (row.status or {}).get("error"):
            raise InstanceFailed(f"the node agent could not {label}: {row.status['error']}")
        if time.monotonic() > deadline:
            raise InstanceFailed(f"{label}: the node did not report {want} within {timeout:g} s "
                                 f"(last seen {row.power_state})")
        now = time.monotonic()
        if now - last > 1.0:
            last = now
            ctx.progress(start_pct, f"{label}: waiting for the node (now {row.power_state})")
        ctx.check()
        time.sleep(0.2)


@handler("instance.create")
def create(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid = params["instance_id"]
    row = _load(ctx, iid)
    spec = row.spec
    # However this ends short of success, services.task_guard gives back the claim and
    # the ports and marks the instance error (runner, cancel and reaper all call it).
    ctx.progress(5, "schedule: choosing a node")
    with session_scope(ctx.db_url) as session:
        images.resolve(session, row.project_id, spec["image"], row.kind)
        choice = placement.claim(session, row.kind, iid, instances.placement_request(session, row))
        node = session.scalar(select(Node.id).where(Node.name == choice.host))
        live = session.get(Instance, iid)
        assert live is not None
        instances.KINDS[live.kind].write_status(session, live, {"node": choice.host},
                                                columns={"node_id": node, "task_state": "spawning"})
    ctx.progress(25, "volumes: preparing disks")
    disks = _volumes(ctx, row)
    ctx.progress(35, f"volumes: {len(disks)} disk(s) ready" if disks else "volumes: none to prepare")
    if disks:
        _update(ctx, iid, status={"volumes": disks})
    ctx.progress(40, "ports: attaching networks")
    _ports(ctx, row)
    ctx.progress(60, f"define: asking {choice.host} to define the {row.kind}")
    initial = spec.get("initial_power", "running")
    _update(ctx, iid, spec={"power": initial})
    want = "running" if initial == "running" else "shutdown"
    _wait_power(ctx, iid, want, 80, "start")
    _update(ctx, iid, vm_state="active" if want == "running" else "stopped", task_state=None)
    return {"node": choice.host}


def _wait_task(ctx: TaskContext, task_id: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(ctx.db_url, readonly=True) as session:
            task = session.get(Task, task_id)
            state, error = (task.state, task.error) if task else ("failed", "vanished")
        if state == "succeeded":
            return
        if state in ("failed", "cancelled"):
            raise InstanceFailed(f"preparing a volume {state}: {error}")
        if time.monotonic() > deadline:
            raise InstanceFailed(f"preparing a volume took more than {timeout:g} s")
        ctx.check()
        time.sleep(0.1)


def _volumes(ctx: TaskContext, row: Instance) -> list[dict[str, Any]]:
    """The VM's disks, in order: a root volume cloned (O(1)) from a disk image, then the
    volumes the spec lists; each entry carries its NBD exports."""
    spec = row.spec or {}
    sub = None
    with session_scope(ctx.db_url) as session:
        project = session.get(Project, row.project_id)
        assert project is not None
        image = images.resolve(session, row.project_id, spec["image"], row.kind)
        names = list(spec.get("volumes") or [])
        root = spec.get("root_volume")
        if image.spec.get("format") == "disk" and root is None:
            root = f"{row.name}-root"[:63]
            made, sub = volumes.create(session, SYSTEM, project.name, root, size=spec.get("root_size"),
                                       source={"image": image.name}, labels={"instance": f"{row.kind}/{row.name}"})
            made.instance_id = row.id  # new in this transaction: nobody else can hold it
            names.insert(0, root)
            live = session.get(Instance, row.id)
            assert live is not None
            live.spec = {**live.spec, "volumes": names, "root_volume": root}
    if sub is not None:
        ctx.progress(28, f"volumes: cloning image {spec['image']} into {root} (O(1))")
        _wait_task(ctx, sub["id"])
    out = []
    with session_scope(ctx.db_url) as session:
        for name in names:
            vol = session.scalar(select(Volume).where(Volume.project_id == row.project_id, Volume.name == name))
            if vol is None or not (vol.status or {}).get("export"):
                raise InstanceFailed(f"volume '{name}' is gone or not exported")
            out.append({"volume": name, "id": vol.id, "export": vol.status["export"],
                        "exports": vol.status.get("exports", {}), "owned": name == root})
    return out


def _ports(ctx: TaskContext, row: Instance) -> list[dict[str, Any]]:
    """One port per requested network (named <instance>-eth<i>), plus the given ports;
    each entry carries what the node needs to plug it in (VNI, addresses, gateway)."""
    out = []
    with session_scope(ctx.db_url) as session:
        project = session.get(Project, row.project_id)
        assert project is not None
        wanted = [(net, None) for net in (row.spec or {}).get("networks", [])]
        wanted += [(None, port) for port in (row.spec or {}).get("ports", [])]
        for i, (net, existing) in enumerate(wanted):
            if existing is None:
                port = networks.create_port(session, SYSTEM, project.name, f"{row.name}-eth{i}"[:63],
                                            {"network": net, "security_groups": row.spec.get("security_groups", [])})
            else:
                port = networks.ports.get(session, SYSTEM, project.name, existing)
            port_row, _ = networks.ports.row(session, SYSTEM, project.name, port["name"], "write")
            network = session.get(Network, port_row.network_id)
            assert network is not None
            ips = []
            for ip in port["status"]["ips"]:
                sub = session.scalar(select(Subnet).where(Subnet.project_id == row.project_id,
                                                          Subnet.name == ip["subnet"]))
                ips.append({**ip, "prefix": int(sub.cidr.split("/")[1]) if sub else 32,
                            "gateway": sub.spec.get("gateway") if sub else None})
            networks.ports.set_status(session, port_row, instance=f"{row.kind}/{row.name}", phase="Attached")
            out.append({"id": port["id"], "name": port["name"], "mac": port["status"]["mac"], "ips": ips,
                        "network": network.name, "network_id": network.id, "vni": network.vni,
                        "mtu": network.spec.get("mtu"), "owned": existing is None})
        if out:  # recorded with the ports, in one transaction: whatever ends the task, they are found
            live = session.get(Instance, row.id)
            assert live is not None
            instances.KINDS[live.kind].write_status(session, live, {"ports": out})
    return out


@handler("instance.action")
def act(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid, verb, power = params["instance_id"], params["action"], params["power"]
    row = _load(ctx, iid)
    ctx.progress(10, f"{verb}: asking the node")
    changes: dict[str, Any] = {"power": power}
    if "stop_timeout" in params:
        changes["stop_timeout"] = params["stop_timeout"]
    if verb == "reboot":
        changes["reboots"] = int(row.spec.get("reboots", 0)) + 1
    _update(ctx, iid, spec=changes)
    want = {"running": "running", "stopped": "shutdown", "paused": "paused"}[power]
    _wait_power(ctx, iid, want, 50, verb)
    state = {"running": "active", "stopped": "stopped", "paused": "paused"}[power]
    _update(ctx, iid, vm_state=state, task_state=None, status={"error": None})
    return {"power_state": want}


@handler("instance.delete")
def delete(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid = params["instance_id"]
    row = _load(ctx, iid)
    if row.node_id:
        ctx.progress(10, "asking the node to remove it")
        _update(ctx, iid, spec={"power": "deleted"})
        deadline = time.monotonic() + 120
        while not (_load(ctx, iid).status or {}).get("removed"):
            with session_scope(ctx.db_url) as session:
                node = session.get(Node, row.node_id)
                if node is None or node.phase != "Ready":
                    break  # a dead node cannot answer; its instance is fenced with it
            if time.monotonic() > deadline:
                raise InstanceFailed("the node did not remove the instance within 120 s")
            ctx.check()
            time.sleep(0.2)
    ctx.progress(70, "releasing resources and ports")
    with session_scope(ctx.db_url) as session:
        live = session.get(Instance, iid)
        if live is None:
            return {}
        project = session.get(Project, live.project_id)
        assert project is not None
        instances.release_placement(session, live, project.name)
        volumes.detach_all(session, iid)
        instances.KINDS[live.kind].delete(session, SYSTEM, project.name, live.name)
        session.flush()
        owned = {d["volume"] for d in (live.status or {}).get("volumes", []) if d.get("owned")}
        if (live.spec or {}).get("root_volume"):  # also when the create ended before recording it
            owned.add(live.spec["root_volume"])
        for name in sorted(owned):  # its root volume goes with it; attached volumes stay
            try:
                volumes.delete(session, SYSTEM, project.name, name)
            except CairnError:
                pass  # already gone, or busy: the user can delete it later
    return {}


@handler("image.import_test_guest")
def import_test_guest(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Build (once, cached) the tiny guest and the busybox OCI archive, copy them to
    the images directory and record them."""
    import shutil

    from compute.testguest import ensure_test_guest

    settings = get_settings()
    ctx.progress(10, "building the tiny guest (kernel + busybox initramfs) and a busybox OCI image")
    guest = ensure_test_guest(settings.data_dir / "cache" / "testguest")
    ctx.progress(70, "copying into the image store")
    store = settings.images_dir / "tiny-guest"
    store.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, src in (("kernel", guest.kernel), ("initrd", guest.initrd), ("archive", guest.oci_archive)):
        dst = store / Path(src).name
        if not dst.exists() or dst.stat().st_size != Path(src).stat().st_size:
            shutil.copyfile(src, dst)
        files[key] = str(dst)
    from appliance import imagefiles

    ctx.progress(85, "sharing the files with the cluster")
    blobs = imagefiles.publish(settings, list(files.values()))
    with session_scope(ctx.db_url) as session:
        images.record(session, params["project_id"], "tiny-guest",
                      {"kind": "vm", "format": "kernel", "kernel": files["kernel"], "initrd": files["initrd"],
                       "cmdline": "console=ttyS0", "marker": guest.marker,
                       "blobs": {p: blobs[p] for p in (files["kernel"], files["initrd"])}})
        images.record(session, params["project_id"], "busybox",
                      {"kind": "container", "format": "oci", "archive": files["archive"],
                       "command": ["/bin/sh", "-c", "while true; do sleep 3600; done"],
                       "blobs": {files["archive"]: blobs[files["archive"]]}})
    return {"vm": "tiny-guest", "container": "busybox"}


@handler("container.exec")
def container_exec(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Run on the container's node: crun exec, or through the agent inside its microVM
    (``isolation: vm``); output captured (bounded)."""
    from compute.oci_driver import OciDriver
    from compute.vm_isolation import exec_in

    ctx.progress(10, f"running {params['command'][0]}")
    settings = get_settings()
    argv, timeout, tty = list(params["command"]), float(params.get("timeout", 60)), bool(params.get("tty"))
    if params.get("isolation") == "vm":
        result = exec_in(settings.data_dir / "microvms", params["domain"], argv, tty=tty, timeout=timeout)
    else:
        driver = OciDriver(settings.data_dir / "containers", host_prefix=settings.host_prefix)
        result = driver.exec(params["domain"], argv, timeout=timeout, tty=tty)
    limit = 1 << 20
    return {"returncode": result.returncode, "stdout": result.stdout[-limit:].decode(errors="replace"),
            "stderr": result.stderr[-limit:].decode(errors="replace")}


@dataclass
class _Arrival:
    """What the target's agent said when it got ready for a guest."""

    run_as: tuple[int, int] | None = None  # the guest's uid:gid there
    data_dir: str | None = None  # its data directory (where the guest's folder is)


def _wait_arrival_ready(ctx: TaskContext, iid: str, to: str, seconds: float = 15.0) -> _Arrival:
    """The target's agent makes the VM's folder there, gives it a uid of its own with
    access to its files and volumes, and says so (status.migration: ready_on, run_as,
    data_dir); on an older agent that never says, go ahead after ``seconds`` (as the
    target's default user, with this node's paths)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        migration = (_load(ctx, iid).status or {}).get("migration") or {}
        if migration.get("ready_on") == to:
            run_as = migration.get("run_as")
            return _Arrival((int(run_as[0]), int(run_as[1])) if run_as else None, migration.get("data_dir"))
        ctx.check()
        time.sleep(0.2)
    return _Arrival()


@handler("instance.migrate")
def migrate(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Runs on the source node: reserve on the target, move, then release the source."""
    iid, to, mode = params["instance_id"], params["to"], params["mode"]
    row = _load(ctx, iid)
    temp_id = f"migrating-{iid}"[:36]  # a failure releases it (services.task_guard)
    ctx.progress(10, f"reserving room on {to}")
    with session_scope(ctx.db_url) as session:
        placement.claim(session, row.kind, temp_id, instances.placement_request(session, row, selector=False),
                        only=to)
        target = session.scalar(select(Node).where(Node.name == to))
        assert target is not None
        inventory = (target.status or {}).get("inventory", {})
        target_id = target.id
        target_uri = inventory.get("migration_uri") or inventory.get("libvirt_uri")
        target_host = inventory.get("migration_host")
    result: dict[str, Any] = {"mode": mode, "to": to}
    if mode == "live":
        ctx.progress(20, f"waiting for {to} to get ready for it")
        arrival = _wait_arrival_ready(ctx, iid, to)
        ctx.progress(30, f"live-migrating to {to}")
        from compute.libvirt_driver import LibvirtDriver

        settings = get_settings()
        here = str(settings.data_dir)
        paths = {here: arrival.data_dir} if arrival.data_dir and arrival.data_dir != here else {}
        driver = LibvirtDriver(settings.libvirt_uri, settings.virt_type, settings.migration_host)
        try:
            moved = driver.migrate(row.status["domain"], target_uri, target_host, run_as=arrival.run_as,
                                   paths=paths)
        finally:
            driver.close()
        result.update(duration_s=round(moved.duration_s, 3), downtime_ms=moved.downtime_ms,
                      run_as=list(arrival.run_as) if arrival.run_as else None)
    ctx.progress(80, "moving the reservation and the record")
    with session_scope(ctx.db_url) as session:  # one transaction: the claim moves with the record
        placement.release(session, iid)
        session.execute(update(Claim).where(Claim.workload_id == temp_id).values(workload_id=iid))
        live = session.get(Instance, iid)
        assert live is not None
        # For a restart-style move the old node's agent removes it; the new one starts it.
        instances.KINDS[live.kind].write_status(session, live, {"node": to, "migration": result},
                                                columns={"node_id": target_id, "vm_state": "active",
                                                         "task_state": None})
    if mode == "restart":
        _wait_power(ctx, iid, "running", 90, f"restart on {to}")
    return result


@handler("instance.failover")
def failover(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Restart an HA instance of a lost node on a survivor. The HA manager queues it only
    after the lost node was fenced (its storage cut off, its volume locks broken), so the
    copy started here is the only one that can write."""
    iid, lost_node = params["instance_id"], params["from"]
    row = _load(ctx, iid)
    # if this fails, services.task_guard puts the instance in error with the reason
    ctx.progress(10, f"fenced {lost_node}: choosing a surviving node")
    with session_scope(ctx.db_url) as session:
        placement.release(session, iid)
        # pinned to the lost node by name: anywhere else will do
        choice = placement.claim(session, row.kind, iid, instances.placement_request(session, row, pinned=False))
        node = session.scalar(select(Node.id).where(Node.name == choice.host))
    ctx.progress(30, f"placed on {choice.host}: its volumes are taken over when it opens them")
    _update(ctx, iid, node_id=node, status={"node": choice.host, "error": None,
                                            "failover": {"from": lost_node, "to": choice.host}})
    ctx.progress(50, f"start on {choice.host}")
    want = "running" if (row.spec or {}).get("power", "running") == "running" else "shutdown"
    _wait_power(ctx, iid, want, 70, f"start on {choice.host}")
    _update(ctx, iid, vm_state="active", task_state=None)
    return {"from": lost_node, "to": choice.host}
