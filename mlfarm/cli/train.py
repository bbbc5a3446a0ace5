"""``mlfarm train``: queue a training run on the farm's ``train`` queue."""

from __future__ import annotations

import json
import os
import re

import click

LAYOUT = """
\b
Data layouts (EXR, PNG, JPEG or TIFF; pairs matched by file name):
  img2img   DIR/train/input/NAME.ext, DIR/train/groundtruth/NAME.ext  [DIR/val/input, DIR/val/groundtruth]
  classify  DIR/train/CLASS/*.ext, one folder per class                [DIR/val/CLASS]
"""


def _default_name(template: str, data: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.basename(os.path.normpath(data))).strip("_-") or "run"
    return f"{base}_{template}"[:64]


@click.command("train", epilog=LAYOUT)
@click.option("--template", type=click.Choice(["img2img", "classify"]), required=True,
              help="img2img: multi-scale encoder-decoder from input/groundtruth pairs; classify: small CNN.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Data folder (layout below).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Passes over the training images.")
@click.option("--batch", type=int, default=8, show_default=True, help="Crops per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--crop", type=int, default=256, show_default=True, help="Square random crop size (multiple of 8).")
@click.option("--seed", type=int, default=None, help="Seed for a reproducible run (default: a random one, "
              "recorded in run.json).")
@click.option("--crops-per-image", type=int, default=1, show_default=True, help="Random crops of each image "
              "per epoch.")
@click.option("--features", type=int, default=16, show_default=True, help="Network width (channels of its "
              "first layer).")
@click.option("--name", default=None, help="Run and model name (default: DATA folder name + template).")
@click.option("--resume", is_flag=True, help="Continue run NAME from its newest checkpoint (--epochs may grow).")
@click.option("--priority", type=int, default=50, show_default=True, help="0-100, higher first.")
@click.option("--wait", is_flag=True, help="Follow the run; exit 0 only if every epoch is done.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def train_command(ctx: click.Context, template: str, data: str, epochs: int, batch: int, lr: float, crop: int,
                  seed: int | None, crops_per_image: int, features: int, name: str | None, resume: bool,
                  priority: int, wait: bool, as_json: bool) -> None:
    """Train a model on the farm; when it has a checkpoint it is in the catalog as model NAME.

    Progress (epochs, step, loss) shows in `mlfarm status`; the run's folder on shared storage,
    STORAGE_ROOT/trained/NAME/, holds its checkpoints, log.csv and TensorBoard event files.
    """
    from mlfarm.models.training.data import DataError
    from mlfarm.models.training.runs import RunError, TrainConfig
    from mlfarm.training_jobs import new_seed, submit_training

    from .common import FarmError, connect, console, wait_and_exit

    explicit = {p for p in ("epochs", "batch", "lr", "crop", "seed", "crops_per_image", "features", "data",
                            "template")
                if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT}
    config = TrainConfig(name=name or _default_name(template, data), template=template, data=data, epochs=epochs,
                         batch=batch, lr=lr, crop=crop, seed=new_seed() if seed is None else seed,
                         crops_per_image=crops_per_image, features=features)
    farm = connect()
    try:
        spec = submit_training(farm, config, resume, explicit, priority)
    except (RunError, DataError) as exc:
        raise FarmError(str(exc)) from None
    trained = spec.options
    if as_json and not wait:
        click.echo(json.dumps({"id": spec.id, "name": spec.model, "run": spec.output, "epochs": spec.frames,
                               "seed": trained["seed"]}))
    elif not as_json:
        console.print(f"job {spec.id}: training {spec.model} ({template}), epochs {spec.frames[0]}-{spec.frames[-1]}, "
                      f"seed {trained['seed']}, on the train queue -> {spec.output}")
    if wait:
        wait_and_exit(farm, spec.id, as_json)
