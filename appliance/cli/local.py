"""Commands that act on this machine rather than through the API: ``up`` starts the
node (its systemd units on an installed appliance, else the embedded supervisor),
``down`` stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from appliance import pki, supervisor, units
from appliance.cli.client import ApiError, Client, load_config, save_config
from appliance.cli.output import err_console
from appliance.db.engine import session_scope
from appliance.errors import CairnError
from appliance.processes import prepare
from appliance.services import auth
from appliance.settings import Settings, get_settings


def ensure_cli_token(settings: Settings) -> None:
    """Log root's CLI in as the first admin (a token in a 0600 config file)."""
    cfg = load_config()
    url = settings.resolved_api_url
    ca_file = str(settings.pki_dir / "ca.crt")
    with session_scope(settings.resolved_database_url) as session:
        token = cfg.get("token")
        if token and cfg.get("url") == url:
            try:
                auth.authenticate_token(session, token)
                return
            except CairnError:
                pass
        from sqlalchemy import select

        from appliance.db.models import User

        admin = session.scalar(select(User).where(User.cluster_role == "admin").order_by(User.created_at))
        assert admin is not None, "no admin user: the database was not bootstrapped"
        principal = auth.principal_for(session, admin, "token")
        created = auth.create_token(session, principal, f"cli-{int(time.time() * 1000) % 10**12}", None)
    save_config({"url": url, "token": created["token"], "ca_file": ca_file, "user": admin.name})


def spawn_supervisor(settings: Settings) -> None:
    """Start this node's supervisor in the background (it outlives the command)."""
    log = open(settings.log_dir / "supervisor.log", "ab")  # noqa: SIM115
    subprocess.Popen([sys.executable, "-m", "appliance.supervisor"], stdin=subprocess.DEVNULL,
                     stdout=log, stderr=log, start_new_session=True, close_fds=True)
    log.close()


def up(timeout: float, quiet: bool = False, ceph: bool = False,
       spawn: Callable[[Settings], None] | None = None) -> dict[str, Any]:
    """Start this node (idempotent): its systemd units on an installed appliance
    (``cairn.target``, enabled from now on), else the embedded supervisor. A cluster
    node's database lives in its engines, so its schema is made by the API once the
    engines run; the CLI logs in after that."""
    settings = get_settings()
    systemd = spawn is None and units.installed()
    start = spawn or (_start_units if systemd else spawn_supervisor)
    if settings.cluster is not None:
        return _up_cluster_node(settings, timeout, quiet, start, systemd)
    prepare(settings)
    if ceph and not settings.ceph_enabled:
        (settings.data_dir / "ceph.enabled").write_text("cairn up --ceph\n")  # kept: later `up`s keep Ceph
        pid = supervisor.running_pid(settings)
        if pid is not None:
            os.kill(pid, signal.SIGHUP)  # the running supervisor adds the ceph program
    pki.ensure(settings.pki_dir)
    ensure_cli_token(settings)
    started = not _running(settings, systemd)
    if started and not systemd:
        conflict = supervisor.stack_conflict(settings)
        if conflict:
            raise SystemExit(conflict)
    if started or systemd:  # systemd also starts a unit of the target that is not running (cairn-ceph)
        start(settings)
    phase = wait_ready(settings, timeout, quiet)
    return _summary(settings, started, phase)


def _start_units(settings: Settings) -> None:
    try:
        units.start()
    except units.UnitError as exc:
        raise SystemExit(str(exc))


def _running(settings: Settings, systemd: bool) -> bool:
    return units.active() if systemd else supervisor.running_pid(settings) is not None


def _up_cluster_node(settings: Settings, timeout: float, quiet: bool,
                     start: Callable[[Settings], None], systemd: bool) -> dict[str, Any]:
    for d in (settings.data_dir, settings.log_dir, settings.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    started = not _running(settings, systemd)
    if started or systemd:
        start(settings)
    deadline = time.monotonic() + timeout
    status = err_console.status("waiting for the cluster database") if not quiet else None
    if status:
        status.start()
    try:
        while True:
            try:
                _bounded(lambda: ensure_cli_token(settings), deadline - time.monotonic())
                break
            except Exception as exc:  # database not up, schema not made yet, or no answer in time
                if time.monotonic() > deadline:
                    raise SystemExit(f"the cluster database did not answer within {timeout:g} s ({exc}); "
                                     f"see `cairn cluster status` and the logs in {settings.log_dir}")
                time.sleep(1)
    finally:
        if status:
            status.stop()
    phase = wait_ready(settings, max(10.0, deadline - time.monotonic()), quiet)
    return _summary(settings, started, phase)


def _bounded(fn: Callable[[], object], seconds: float) -> None:
    """``fn()``, but give up after ``seconds``: an attempt may hang rather than fail (a
    commit waiting for a synchronous standby that does not stream), and a daemon thread is
    not waited for when the command exits."""
    failed: list[BaseException] = []

    def attempt() -> None:
        try:
            fn()
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=attempt, name="cairn-up-attempt", daemon=True)
    worker.start()
    worker.join(max(1.0, seconds))
    if worker.is_alive():
        raise TimeoutError("a database write did not return: is a replica streaming?")
    if failed:
        raise failed[0]


def _summary(settings: Settings, started: bool, phase: str) -> dict[str, Any]:
    host = socket.gethostname()
    return {
        "started": started,
        "console": f"https://{host}:{settings.api_port}/",
        "api": settings.resolved_api_url + "/api/v1",
        "user": "admin",
        "password_file": str(settings.admin_password_file),
        "ca_file": str(settings.pki_dir / "ca.crt"),
        "node": settings.node_name,
        "phase": phase,
        "logs": str(settings.log_dir),
    }


def wait_ready(settings: Settings, timeout: float, quiet: bool) -> str:
    """Until this node is Ready; a node drained for maintenance stays Maintenance until its
    undrain, so for it a heartbeat of its agent after the wait began is enough (a rolling
    upgrade reboots drained nodes)."""
    deadline = time.monotonic() + timeout
    since = datetime.now(UTC)
    client = Client()
    phase, last_error = "Unknown", ""
    status = err_console.status("waiting for the API and the node agent") if not quiet else None
    if status:
        status.start()
    try:
        while time.monotonic() < deadline:
            try:
                node = client.get(f"/nodes/{settings.node_name}")
                phase = str(node["status"].get("phase", "Unknown"))
                if phase == "Ready" or (phase == "Maintenance" and _beat_since(node, since)):
                    return phase
            except ApiError as exc:
                last_error = exc.detail
            time.sleep(0.3)
    finally:
        if status:
            status.stop()
    raise SystemExit(f"the appliance did not become Ready within {timeout:g} s (last: {phase}; "
                     f"{last_error}); see the logs in {settings.log_dir}")


def _beat_since(node: dict[str, Any], since: datetime) -> bool:
    beat = node["status"].get("last_heartbeat")
    try:
        return bool(beat) and datetime.fromisoformat(str(beat).replace("Z", "+00:00")) > since
    except ValueError:
        return False


def down() -> dict[str, Any]:
    """Stop every process and this node's workloads (VMs go with libvirt; containers
    are stopped here). Desired state stays in the database: `cairn up` restarts them."""
    settings = get_settings()
    if supervisor.running_pid(settings) is None and units.installed():
        if not units.active():
            return {"stopped": False, "message": "the appliance is not running"}
        try:
            units.stop()  # it stays enabled: the node starts again at its next boot
        except units.UnitError as exc:
            raise SystemExit(str(exc))
        stopped = _stop_containers(settings)
        _remove_overlay(settings)
        return {"stopped": True, "units": units.TARGET, "containers_stopped": stopped}
    pid = supervisor.running_pid(settings)
    if pid is None:  # the containers (and their volumes' mounts) and overlay of a crashed appliance still go
        stopped = _stop_containers(settings)
        _remove_overlay(settings)
        return {"stopped": False, "message": "the appliance is not running", "containers_stopped": stopped}
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    forced = False
    while supervisor.running_pid(settings) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            forced = True
            break
        time.sleep(0.1)
    stopped = _stop_containers(settings)
    _remove_overlay(settings)
    return {"stopped": True, "pid": pid, "forced": forced, "containers_stopped": stopped}


def _remove_overlay(settings: Settings) -> None:
    """Take this node's bridges, VXLAN devices and router rules down with it; `cairn up`
    rebuilds them."""
    from appliance.agent.inventory import underlay
    from network.model import HostNames, NodeNetworkState
    from network.reconcile import reconcile
    from network.router import reconcile_router
    from network.secgroups import remove_ruleset

    names = HostNames(settings.stack_tag)
    try:
        remove_ruleset(None, names)
    except Exception as exc:
        err_console.print(f"[yellow]warning:[/yellow] removing the security group rules: {exc}")
    try:
        reconcile_router(None, None, settings.data_dir / "network", pool=settings.external_pool_bounds, names=names)
    except Exception as exc:
        err_console.print(f"[yellow]warning:[/yellow] removing the router rules: {exc}")
    u = underlay(settings.underlay_interface)
    result = reconcile(None, NodeNetworkState(u["ifname"], u["ip"], u["mtu"], ()), settings.data_dir / "network",
                       names)
    if result.error:
        err_console.print(f"[yellow]warning:[/yellow] removing the overlay: {result.error}")


def _stop_containers(settings: Settings) -> int:
    state = settings.data_dir / "containers"
    if not state.exists():
        return 0
    from compute.oci_driver import OciDriver

    driver = OciDriver(state, host_prefix=settings.host_prefix)
    names = driver.list_instances()
    for name in names:
        try:
            driver.delete(name)
        except Exception as exc:  # keep going: one stuck container must not block the rest
            err_console.print(f"[yellow]warning:[/yellow] could not stop container {name}: {exc}")
    return len(names)


def services() -> dict[str, Any]:
    """This machine's Cairn processes: the embedded supervisor's programs, or on an installed
    appliance its systemd units (empty when the appliance runs elsewhere)."""
    settings = get_settings()
    if supervisor.running_pid(settings) is None:
        return units.states() if units.installed() else {}
    try:
        state = json.loads((settings.run_dir / "supervisor.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: {"running": info["pid"] is not None, "pid": info["pid"], "restarts": info["restarts"]}
            for name, info in state["programs"].items()}
