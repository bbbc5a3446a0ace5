"""One interactive frame through a warm model: the same code in a worker and in ``--local``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mlfarm.models.base import BaseModel
from mlfarm.tensors import is_tensor

from .images import WireImage


class ModelOutputError(RuntimeError):
    """The model returned something the MLClient protocol cannot carry."""


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays in a model's objects; anything else becomes text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def run_model(model: BaseModel, options: Mapping[str, Any], images: Sequence[WireImage]
              ) -> tuple[list[WireImage], list[Any]]:
    """Decode, infer with ``options`` (validated, defaults included), encode.

    The options go with this frame only (``BaseModel.with_options``): the warm model is shared
    with other requests and chunks, which may run it meanwhile with options of their own.
    """
    arrays = [img.to_array() for img in images]
    model = model.with_options(options)
    # The same three stages as a farm chunk: a model that prepares frames in preprocess (pinned
    # memory) or finishes them in postprocess (waits for a device copy, draws labels) gets them here too.
    outputs = model.infer_batch([model.preprocess(arrays)])
    if len(outputs) != 1:
        raise ModelOutputError(f"infer_batch returned {len(outputs)} results for 1 frame")
    out_images, objects = [], []
    for item in model.postprocess(list(outputs[0])):
        if is_tensor(item):  # planes left on a device (e.g. for GPU compression) come to the host
            item = item.cpu().numpy()
        if isinstance(item, np.ndarray):
            out_images.append(WireImage.from_array(item))
        else:
            objects.append(item)
    if not out_images and not objects:
        raise ModelOutputError("the model returned neither images nor objects")
    # Objects cross Redis as JSON from a worker; --local normalises the same way so both agree.
    return out_images, json.loads(json.dumps(objects, default=_plain))
