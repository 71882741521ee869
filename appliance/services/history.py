"""History graphs of nodes, instances and pools: who may read which, and the series
read from this node's metrics store (every member's store holds every member's samples,
so any node's API answers for the whole cluster; see ``appliance/timeseries/store.py``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from appliance.services import instances, nodes, pools
from appliance.services.principal import Principal
from appliance.settings import Settings
from appliance.timeseries import series, store


def node(session: Session, principal: Principal, settings: Settings, name: str,
         span: series.Range) -> dict[str, Any]:
    nodes.get(session, principal, name)  # the node exists and the caller may read nodes
    return {"node": name, **series.history(store.store_url(settings), series.NODE, {"node": name}, "node", span,
                                           settings.metrics_interval)}


def instance(session: Session, principal: Principal, settings: Settings, kind: str, project: str, name: str,
             span: series.Range) -> dict[str, Any]:
    data = instances.KINDS[kind].get(session, principal, project, name)
    return {kind: name, "project": project, "id": data["id"],
            **series.history(store.store_url(settings), series.INSTANCE, {"id": data["id"]}, "id", span,
                             settings.metrics_interval)}


def pool(session: Session, principal: Principal, settings: Settings, name: str, span: series.Range) -> dict[str, Any]:
    pools.get(session, principal, name)
    return {"pool": name, **series.history(store.store_url(settings), series.POOL, {"pool": name}, "pool", span,
                                           settings.metrics_interval)}
