"""Where the agent gets its node's desired-state document
(:mod:`appliance.services.desired_state`), and the copy it keeps on local disk.

**Why the agent reads the replicated database (LXD, Proxmox) rather than a node API
(Nova's conductor).** Every Cairn node runs the API and a worker, both holding database
credentials, so a conductor would not keep credentials off the compute nodes, which is
its main point in Nova. It would add a hop whose own availability rests on the same
database: during a failover the API cannot build a document either, so the agent would
fall back to its cache at exactly the same moments. Building the document in the agent,
with the agent's own code, also serves rolling upgrades: a member one release behind
builds the document format it understands from an additively migrated schema, where a
conductor would have to serve every document format still deployed (Nova's object
backports). Cached on disk, the document is the only thing the agent needs while the
database is away. The document is one typed value with a version, so moving to a node
API later is a GET returning the same JSON.

The cache is written atomically (temporary file, fsync, rename, fsync of the
directory) and mode 0600 (user data and environment variables are in it). A document
of a format this code does not know, or one for another node, is ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import ValidationError

from appliance.services import desired_state
from appliance.services.desired_state import NodeDocument
from appliance.settings import Settings

log = logging.getLogger("cairn.agent.document")


class DocumentCache:
    """The last document, on local disk."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node

    def save(self, doc: NodeDocument) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(doc.model_dump_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load(self) -> NodeDocument | None:
        try:
            doc = NodeDocument.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError) as exc:
            log.warning("ignoring an unreadable desired-state cache", extra={"path": str(self.path),
                                                                             "error": str(exc)[:500]})
            return None
        if doc.schema_version != desired_state.SCHEMA_VERSION or doc.node != self.node:
            log.warning("ignoring a desired-state cache of another format or node",
                        extra={"schema_version": doc.schema_version, "node": doc.node})
            return None
        return doc


class DesiredState:
    """The document for this pass: built from the database when it answers (and then
    cached), else the cached one (``fresh`` False: act on it, do not remove anything
    because it is absent from it, and do not try to report)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = DocumentCache(settings.desired_state_file, settings.node_name)
        self.document: NodeDocument | None = None
        self.fresh = False
        self._saved = ""

    def refresh(self) -> tuple[NodeDocument | None, str | None]:
        """(document, why it is not fresh). None when the database never answered and
        there is no cache."""
        try:
            doc = desired_state.for_node(self.settings.resolved_database_url, self.settings.node_name)
        except Exception as exc:  # the database is away (failover), or the node row is gone
            why = f"desired state from the database: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"
            if self.document is None:
                self.document = self.cache.load()
                if self.document is not None:
                    self._saved = self.document.revision
            self.fresh = False
            return self.document, why
        if doc.revision != self._saved:
            self.cache.save(doc)
            self._saved = doc.revision
        self.document, self.fresh = doc, True
        return doc, None
