"""The control plane's exception hierarchy. The API maps each to an RFC 9457
problem+json response; the message must tell a person what to fix."""

from __future__ import annotations


class CairnError(Exception):
    status = 500
    title = "Internal error"
    type_slug = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(CairnError):
    status = 422
    title = "Invalid input"
    type_slug = "invalid-input"


class NotFound(CairnError):
    status = 404
    title = "Not found"
    type_slug = "not-found"


class Conflict(CairnError):
    status = 409
    title = "Conflict"
    type_slug = "conflict"


class StaleGeneration(Conflict):
    title = "Stale generation"
    type_slug = "stale-generation"


class Unauthenticated(CairnError):
    status = 401
    title = "Authentication required"
    type_slug = "unauthenticated"


class PermissionDenied(CairnError):
    status = 403
    title = "Permission denied"
    type_slug = "permission-denied"


class Unavailable(CairnError):
    status = 503
    title = "Service unavailable"
    type_slug = "unavailable"


class PayloadTooLarge(CairnError):
    status = 413
    title = "Payload too large"
    type_slug = "payload-too-large"


class TooManyRequests(CairnError):
    status = 429
    title = "Too many requests"
    type_slug = "too-many-requests"

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
