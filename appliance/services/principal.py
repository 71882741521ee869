"""Who is calling, and what they may do. Roles: viewer < operator < admin,
either cluster-wide (``cluster_role``) or per project (role bindings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.errors import PermissionDenied

ROLES = ("viewer", "operator", "admin")
RANK = {role: i + 1 for i, role in enumerate(ROLES)}
Action = Literal["read", "write", "admin"]
NEEDED: dict[str, str] = {"read": "viewer", "write": "operator", "admin": "admin"}


@dataclass(frozen=True)
class Principal:
    user_id: str
    user_name: str
    cluster_role: str | None
    # project id -> (project name, role)
    projects: dict[str, tuple[str, str]] = field(default_factory=dict)
    via: str = "token"

    def _has(self, role: str | None, action: Action) -> bool:
        return role is not None and RANK[role] >= RANK[NEEDED[action]]

    def can_cluster(self, action: Action) -> bool:
        return self._has(self.cluster_role, action)

    def can_project(self, project_id: str, action: Action) -> bool:
        if self.can_cluster(action):
            return True
        entry = self.projects.get(project_id)
        return entry is not None and self._has(entry[1], action)

    def require_cluster(self, action: Action) -> None:
        if not self.can_cluster(action):
            raise PermissionDenied(
                f"user '{self.user_name}' needs the cluster role '{NEEDED[action]}' or higher for this"
            )

    def require_project(self, project_id: str | None, action: Action, project_name: str = "") -> None:
        if project_id is None:
            self.require_cluster(action)
            return
        if not self.can_project(project_id, action):
            label = project_name or self.projects.get(project_id, (project_id, ""))[0]
            raise PermissionDenied(
                f"user '{self.user_name}' needs the role '{NEEDED[action]}' or higher in project '{label}'"
            )

    def readable_project_ids(self) -> set[str] | None:
        """None means every project (cluster viewers and above)."""
        if self.can_cluster("read"):
            return None
        return set(self.projects)
