"""An engine on a stand-in manager and runner, for its metrics alone (no model, no server)."""

from __future__ import annotations

from types import SimpleNamespace

from model.config import get_preset
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings


def engine_metrics(runner: SimpleNamespace) -> Metrics:
    """The metrics of an engine built on `runner` (its `pool`, `memory_stats`,
    `bytes_per_session`, `free_device_bytes`) and an empty, ready session manager."""
    metrics = Metrics()
    manager = SimpleNamespace(
        runner=runner,
        settings=Settings(),
        cfg=get_preset("tiny"),
        metrics=metrics,
        active=[],
        sessions={},
        ended={},
        waiting=[],
        ready=True,
        draining=False,
    )
    Engine(manager)
    return metrics
