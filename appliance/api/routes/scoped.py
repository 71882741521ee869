"""List / get / delete routes for a project-scoped kind, made once (create bodies
differ per kind and stay explicit in each module)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from appliance.api.deps import Caller, DbSession, access
from appliance.api.schemas import Limit, Name, ResourceList, ResourcePublic

ProjectQuery = Annotated[str, Query(min_length=1, max_length=63, description="project name")]
ProjectFilter = Annotated[str | None, Query(max_length=63, description="only this project")]
Getter = Callable[[Any, Any, str, str], dict[str, Any]]
Deleter = Callable[[Any, Any, str, str], None]


def add_scoped_routes(router: APIRouter, path: str, kind: Any, *, get: Getter | None = None,
                      delete: Deleter | None = None) -> None:
    """``GET path`` (every project you can see, or ``?project=``), ``GET path/{name}``
    and ``DELETE path/{name}`` for ``kind`` (a ScopedKind)."""
    label = kind.kind.replace("-", "_")
    getter = get or kind.get

    def list_items(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                   project: ProjectFilter = None) -> dict[str, Any]:
        items, nxt = kind.list_(session, caller, project, limit, cursor)
        return {"items": items, "next_cursor": nxt}

    def get_item(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
        return getter(session, caller, project, name)

    router.add_api_route(path, list_items, methods=["GET"], response_model=ResourceList,
                         openapi_extra=access("authenticated"), name=f"list_{label}s")
    router.add_api_route(path + "/{name}", get_item, methods=["GET"], response_model=ResourcePublic,
                         openapi_extra=access("project:read"), name=f"get_{label}")
    if delete is not None:
        remove = delete

        def delete_item(name: Name, session: DbSession, caller: Caller,
                        project: ProjectQuery = "default") -> Response:
            remove(session, caller, project, name)
            return Response(status_code=204)

        router.add_api_route(path + "/{name}", delete_item, methods=["DELETE"], status_code=204,
                             openapi_extra=access("project:write"), name=f"delete_{label}")
