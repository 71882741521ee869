"""Background work: the Celery app, the task runner and the task handlers."""
