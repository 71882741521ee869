"""The ``node.drain`` task: move every instance of a node in maintenance to the node the
drain planned for it, one at a time: a running VM live-migrates (its guest keeps
running), a container is restarted there, a stopped instance just changes node."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from appliance.db.engine import session_scope
from appliance.db.models import Instance, Node, Project
from appliance.errors import CairnError
from appliance.services import instances, placement
from appliance.tasks.instances import SYSTEM, _update, _wait_task
from appliance.tasks.runner import TaskContext, handler


class DrainFailed(CairnError):
    status = 409
    title = "Drain failed"


@handler("node.drain")
def drain(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    node, planned = params["node"], dict(params["plan"])
    moved: dict[str, str] = {}
    total = max(1, len(planned))
    for i, (iid, target) in enumerate(sorted(planned.items())):
        pct = 5 + 90 * i / total
        with session_scope(ctx.db_url) as session:
            row = session.get(Instance, iid)
            if row is None or (row.spec or {}).get("power") == "deleted":
                continue
            project = session.scalar(select(Project.name).where(Project.id == row.project_id))
            kind, name, running = row.kind, row.name, row.power_state == "running" and row.vm_state == "active"
        ctx.progress(pct, f"{kind} {name}: {'live-migrating' if kind == 'vm' and running else 'moving'} to {target}")
        if running:
            with session_scope(ctx.db_url) as session:
                task = instances.migrate(session, SYSTEM, kind, str(project), name, target)
            _wait_task(ctx, task["id"], timeout=900)
        else:
            with session_scope(ctx.db_url) as session:
                row = session.get(Instance, iid)
                assert row is not None
                placement.release(session, iid)
                placement.claim(session, row.kind, iid, instances.placement_request(session, row, selector=False),
                                only=target)
                target_id = session.scalar(select(Node.id).where(Node.name == target))
            _update(ctx, iid, node_id=target_id, status={"node": target})
        moved[name] = target
    with session_scope(ctx.db_url) as session:
        left = [i.name for i in session.scalars(select(Instance).join(Node, Instance.node_id == Node.id)
                                               .where(Node.name == node))
                if (i.spec or {}).get("power") != "deleted"]
    if left:
        raise DrainFailed(f"{node} still runs {', '.join(left)} (created during the drain?): drain again")
    ctx.progress(100, f"{node} is empty and in maintenance")
    return {"node": node, "moved": moved}
