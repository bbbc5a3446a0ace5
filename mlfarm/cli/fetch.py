"""``mlfarm models fetch NAME``: download a model's weights where the machine has internet.

``mlfarm models`` stays the listing it was (same options); it becomes a group so that ``fetch``
can live under it. A model plugin that can download its weights says so itself
(``BaseModel.weight_variants`` and ``fetch_weights``; Mask R-CNN through torchvision's weights
API), so a new plugin adds nothing here; nothing is ever downloaded implicitly while a job runs.
"""

from __future__ import annotations

from typing import Any

import click


def _variants(catalog: Any, name: str) -> tuple[str, ...]:
    """The weights model ``name`` declares it can download (its ``weight_variants``); none if it
    is unknown or fails to import."""
    try:
        return tuple(catalog.entry(name).create().weight_variants())
    except Exception:  # an unknown or broken plugin has nothing to fetch
        return ()


@click.command()
@click.argument("name")
@click.option("--arch", "--size", "arch", default=None,
              help="Which weights: an architecture or size (default: the model's default ones).")
def fetch(name: str, arch: str | None) -> None:
    """Download model NAME's weights into MLFARM_WEIGHTS_DIR (needs internet; hash-checked)."""
    from mlfarm.models.catalog import Catalog

    from .common import FarmError, console, load_settings

    settings = load_settings()
    catalog = Catalog.from_settings(settings)
    variants = _variants(catalog, name)
    if not variants:
        fetchable = [n for n in catalog.names() if _variants(catalog, n)]
        raise FarmError(f"no downloadable weights for {name!r} (fetchable: {', '.join(fetchable)})")
    model = catalog.entry(name).create()
    chosen = [arch] if arch else list(model.default_weight_variants())
    unknown = [a for a in chosen if a not in variants]
    if unknown:
        raise click.BadParameter(f"{unknown[0]} (choose from {', '.join(variants)})", param_hint="--arch/--size")
    weights_dir = settings.weights_dir
    try:
        paths = [model.fetch_weights(a, weights_dir) for a in chosen]
    except Exception as exc:  # no internet, a proxy, a full disk: say so in one line
        raise FarmError(f"could not fetch {name} weights into {weights_dir}: {exc}") from None
    for variant, p in zip(chosen, paths):
        note = model.weight_licence(variant)
        console.print(f"{name} {variant}: {p}" + (f" (licence: {note})" if note else ""))


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
