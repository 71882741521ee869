"""Use cases. API routes, the CLI's server side, the agent and tasks call these;
each takes a SQLAlchemy session and owns its transaction's meaning."""
