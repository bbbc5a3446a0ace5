"""``mlfarm models fetch NAME``: download a model's weights where the machine has internet.

``mlfarm models`` stays the listing it was (same options); it becomes a group so that ``fetch``
can live under it. Only models that declare a fetcher can be fetched (Mask R-CNN, through
torchvision's weights API); nothing is ever downloaded implicitly while a job runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _fetch_mrcnn(arch: str | None, weights_dir: Path) -> list[Path]:
    from mlfarm.models.builtin.mrcnn.weights import ARCHITECTURES, fetch

    arches = [arch] if arch else list(ARCHITECTURES)
    unknown = [a for a in arches if a not in ARCHITECTURES]
    if unknown:
        raise click.BadParameter(f"{unknown[0]} (choose from {', '.join(ARCHITECTURES)})", param_hint="--arch")
    return [fetch(a, weights_dir) for a in arches]


FETCHERS = {"mrcnn": _fetch_mrcnn}


@click.command()
@click.argument("name")
@click.option("--arch", default=None, help="Only this architecture (default: all of the model's).")
def fetch(name: str, arch: str | None) -> None:
    """Download model NAME's weights into MLFARM_WEIGHTS_DIR (needs internet; hash-checked)."""
    from .common import FarmError, console, load_settings

    if name not in FETCHERS:
        raise FarmError(f"no downloadable weights for {name!r} (fetchable: {', '.join(sorted(FETCHERS))})")
    weights_dir = load_settings().weights_dir
    try:
        paths = FETCHERS[name](arch, weights_dir)
    except click.BadParameter:
        raise
    except Exception as exc:  # no internet, a proxy, a full disk: say so in one line
        raise FarmError(f"could not fetch {name} weights into {weights_dir}: {exc}") from None
    for p in paths:
        console.print(f"{name}: {p}")


def models_group(listing: click.Command) -> click.Group:
    """The ``models`` listing command as a group: no subcommand lists, ``fetch`` downloads weights."""

    @click.pass_context
    def callback(ctx: click.Context, **kwargs: Any) -> None:
        if ctx.invoked_subcommand is None:
            ctx.invoke(listing.callback, **kwargs)

    group = click.Group(name=listing.name, params=list(listing.params), callback=callback,
                        invoke_without_command=True, help=listing.help)
    group.add_command(fetch)
    return group
