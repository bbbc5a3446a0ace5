"""``mlfarm gateway``: serve the MLClient node."""

from __future__ import annotations

import logging
import signal

import click

log = logging.getLogger(__name__)


@click.command()
@click.option("--port", type=int, default=None, help="TCP port (default: MLFARM_GATEWAY_PORT, 55555).")
@click.option("--host", default=None, help="Interface to listen on (default: MLFARM_GATEWAY_HOST).")
@click.option("--local", is_flag=True, help="Run models in this process instead of on the farm's workers.")
def gateway(port: int | None, host: str | None, local: bool) -> None:
    """Serve nuke-ML-server's MLClient node: inference on the farm's warm workers (or --local)."""
    from mlfarm.broker.connection import InsecureBrokerError, NoBrokerError
    from mlfarm.gateway.backends import FarmBackend, LocalBackend
    from mlfarm.gateway.server import Gateway, GatewayConfig

    from .common import FarmError, console, load_settings

    settings = load_settings()
    try:
        backend = LocalBackend(settings) if local else FarmBackend(settings)
    except (NoBrokerError, InsecureBrokerError) as exc:
        raise FarmError(str(exc)) from None
    server = Gateway(backend, GatewayConfig.from_settings(settings, host, port))
    try:
        bound_host, bound_port = server.bind()
    except OSError as exc:
        raise FarmError(f"cannot listen on {server.config.host}:{server.config.port}: {exc}") from None
    where = "in this process (--local)" if local else "on the farm's workers (interactive queue)"
    console.print(f"mlfarm gateway: listening on {bound_host}:{bound_port}, models run {where}. Ctrl-C stops.")

    def _stop(*_: object) -> None:
        server.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    log.info("gateway stopped")
