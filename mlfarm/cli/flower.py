"""``mlfarm flower``: Flower for the farm, as ``mlfarm.flower_monitor`` plans it."""

from __future__ import annotations

import click

from mlfarm.flower_monitor import FlowerConfigError, run_flower

from .common import FarmError, load_settings


@click.command("flower")
def flower_command() -> None:
    """Watch the farm in Flower: workers, chunks (job, name, model, frames), /metrics for Prometheus.

    Listens on MLFARM_FLOWER_ADDRESS:MLFARM_FLOWER_PORT with MLFARM_FLOWER_BASIC_AUTH; keeps its history
    in MLFARM_DATA_DIR/flower across restarts.
    """
    from mlfarm.broker.connection import InsecureBrokerError, NoBrokerError

    try:
        run_flower(load_settings())
    except (FlowerConfigError, NoBrokerError, InsecureBrokerError) as exc:
        raise FarmError(str(exc)) from None
