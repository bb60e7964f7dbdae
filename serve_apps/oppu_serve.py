"""Ray Serve application: every user's OPPU adapter behind one OpenAI-compatible endpoint.

    OPPU_ADMIN_TOKEN=... serve run serve_apps.oppu_serve:build \\
        model=DIR/base store=DIR/adapters data=DIR/data

or ``serve run serve_apps/config.yaml`` / ``serve deploy serve_apps/config.yaml``. The keys are
``oppu.serving.config.ServeConfig``'s (``log_level``, ``log_encoding`` and ``access_log`` set Ray
Serve's logging config of both deployments); docs/serving.md describes the routes.
"""

from __future__ import annotations

import json

from ray import serve
from ray.serve import Application

from oppu import fsutil
from oppu.errors import ConfigError
from oppu.serving.config import ServeConfig, load_serve_config
from oppu.serving.ingress import OppuIngress
from oppu.serving.replica import ModelReplica


def build(args: dict) -> Application:
    """Validate ``args`` into a ``ServeConfig`` and bind the ingress to the model replicas."""
    config = resolve_task(load_serve_config(args))
    model = serve.deployment(
        ModelReplica, name="model", num_replicas=config.num_replicas,
        max_ongoing_requests=config.model_max_ongoing_requests,
        # Requests beyond what the replicas take wait in the ingress's handle; past this many the
        # handle raises BackPressureError, which the ingress answers with 429 and Retry-After.
        max_queued_requests=max(1, config.max_queued_requests),
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        logging_config=config.logging_config(), max_surge_percent=config.model_surge_percent,
    ).bind(config.model_dump())
    # The ingress holds no CPU or GPU: its replacement always starts before it stops (a redeploy
    # never leaves the proxy without one).
    ingress = OppuIngress.options(max_ongoing_requests=config.ingress_max_ongoing_requests,
                                  ray_actor_options={"num_cpus": 0}, logging_config=config.logging_config(),
                                  max_surge_percent=100)
    return ingress.bind(model, config.model_dump())


def resolve_task(config: ServeConfig) -> ServeConfig:
    """Fill ``task`` from the data set's ``dataset.json`` when not given; use the canonical name."""
    from oppu.data.dataset import META_FILE
    from oppu.tasks import get_task

    task = config.task
    if task is None:
        if not config.data:
            raise ConfigError("give 'task' or 'data' (the prepared data set names its task)")
        meta_uri = fsutil.join(config.data, META_FILE)
        try:
            task = json.loads(fsutil.read_text(meta_uri))["task"]
        except FileNotFoundError:
            raise ConfigError(f"data={config.data!r} is not a prepared data set: no {META_FILE}") from None
    return config.model_copy(update={"task": get_task(task).name})
