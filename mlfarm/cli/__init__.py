"""The ``mlfarm`` command (console entry point ``mlfarm.cli:main``).

``farm.py`` holds the group and the farm commands; each other sub-command lives in its own
module (``fetch``, ``train``, ``gateway``, ``flower``) and is added here. ``common.py`` holds what
they share.
"""

from __future__ import annotations

from .farm import main, models
from .fetch import models_group
from .flower import flower_command
from .gateway import gateway as gateway_command
from .train import train_command

main.add_command(models_group(models))  # `mlfarm models fetch NAME` beside the listing
main.add_command(flower_command)
main.add_command(gateway_command)  # the MLClient gateway
main.add_command(train_command)  # training on the farm

__all__ = ["main"]
