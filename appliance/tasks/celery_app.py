"""The Celery application. One generic Celery task, ``cairn.run(task_id)``, runs
whatever handler the task row names; the row (not Celery's result backend) holds
state and progress."""

from __future__ import annotations

from celery import Celery

from appliance.settings import get_settings


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("cairn", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=False,  # the reaper, not redelivery, handles lost workers
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        task_default_queue="cluster",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_transport_options={"visibility_timeout": 3600, **settings.broker_transport_options},
    )
    app.conf.include = ["appliance.tasks.runner"]
    return app


celery = make_celery()


def enqueue(task_id: str, queue: str, countdown: float = 0.0) -> None:
    celery.send_task("cairn.run", args=[task_id], queue=queue, countdown=countdown or None)
