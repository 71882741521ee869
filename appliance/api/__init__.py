"""cairn-api: REST /api/v1 (FastAPI), problem+json errors, SSE events, metrics, console."""
