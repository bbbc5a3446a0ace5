"""``BaseModel``: the authoring surface of a model plugin.

It keeps nuke-ML-server's surface (``name``, ``options``, ``buttons``, ``inputs``, ``outputs``,
``get_*``/``set_*`` and ``inference(image_list)``) so existing models port with an import change,
and adds what a farm needs: multiple-choice options, value ranges, a version, the device it wants,
lazy loading once per worker process, and a batch entry point.

Rules for plugin authors (they keep the catalog cheap): ``__init__`` only declares; import torch and
load weights in ``load()``, which the worker calls once, on first use.
"""

from __future__ import annotations

from typing import Any

from mlfarm.tensors import is_tensor  # noqa: F401  (plugins import it from here)

from .options import Choice, describe_options, option_spec


class InputError(ValueError):
    """A frame this model cannot take (e.g. too few channels); the message is the artist's reason."""


class BaseModel:
    def __init__(self) -> None:
        self.name = "Base model"
        self.options: tuple[str, ...] = ()
        self.buttons: tuple[str, ...] = ()
        self.inputs: dict[str, int] = {"input": 3}
        # Output planes: name -> channel count, or a tuple of channel names (e.g. ("id",)).
        self.outputs: dict[str, int | tuple[str, ...]] = {"output": 3}
        self.option_ranges: dict[str, tuple[float, float]] = {}
        self.version = "1"
        self.device = "gpu"  # "gpu": runs on CUDA where there is one (and on CPU otherwise); "cpu"
        self.batch_size = 1  # frames handed to infer_batch at once
        # Batches the worker may have in infer_batch at once, each from its own thread. Above 1 only
        # for a thread-safe infer_batch, e.g. one that runs each thread on its own CUDA stream: while
        # one batch waits on the GPU (a sync for a variable-sized result), the next is dispatched.
        self.lanes = 1
        self.torch_device = "cpu"  # set by load()
        # True: frames reach preprocess as read, with no copy on the I/O thread: possibly a strided
        # view of the file's float32 channels. For a preprocess that copies them anyway, e.g. into
        # pinned memory for the GPU.
        self.raw_frames = False
        self.sidecar_json = False  # True: non-image results are also written as <frame>.json beside each frame

    # --- the seed's surface -------------------------------------------------------------
    def get_options(self) -> dict[str, Any]:
        return {n: self._plain(getattr(self, n)) for n in self.options}

    def set_options(self, options: dict[str, Any]) -> None:
        for name, value in options.items():
            current = getattr(self, name, None)
            if isinstance(current, Choice):
                setattr(self, name, Choice(value, current.choices))
            else:
                setattr(self, name, value)

    def get_buttons(self) -> dict[str, bool]:
        return {n: bool(getattr(self, n)) for n in self.buttons}

    def set_buttons(self, buttons: dict[str, bool]) -> None:
        for name, value in buttons.items():
            setattr(self, name, bool(value))

    def get_inputs(self) -> dict[str, int]:
        return self.inputs

    def get_outputs(self) -> dict[str, int | tuple[str, ...]]:
        return self.outputs

    def get_name(self) -> str:
        return self.name

    def inference(self, image_list: list[Any]) -> list[Any]:
        """One frame: a list of HxWxC float32 images (one per input) to a list of output images.

        Non-image results (dicts, strings) may follow the images in the returned list.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither inference nor infer_batch")

    # --- the farm's additions ----------------------------------------------------------
    def load(self, device: str) -> None:
        """Called once per worker process before the first frame: import torch, load weights.

        ``device`` is a torch device string ("cuda", "cpu") the worker chose for this model.
        """
        self.torch_device = device

    def unload(self) -> None:
        """Called when the worker's model cache evicts this model: free GPU memory."""

    def check_ready(self, settings: Any) -> str | None:
        """Why this model cannot run with its current options under ``settings`` (the asking process's
        mlfarm settings), e.g. its weights file is missing.

        Called before anything is queued (by the submission client, where it has the model) and by
        the worker before a chunk, so a missing requirement is one clear refusal, not a crash in the
        middle of a job. Must stay cheap: no torch import, no loading. ``None`` means ready.
        """
        return None

    def preprocess(self, image_list: list[Any]) -> Any:
        """Per frame, on the worker's I/O threads, right after the frame is read.

        Its result is what ``infer_batch`` receives for the frame, so a GPU model can, for example,
        copy pixels into pinned memory here while the network works on the previous batch.
        """
        return image_list

    def postprocess(self, outputs: list[Any]) -> list[Any]:
        """Per frame, on the worker's I/O threads, before the frame is written.

        Turns what ``infer_batch`` returned for one frame into output images (one per output plane,
        in order) optionally followed by non-image results, e.g. by waiting for an asynchronous
        device-to-host copy and expanding compact results on the CPU in parallel with the GPU.
        """
        return outputs

    def infer_batch(self, batch: list[list[Any]]) -> list[list[Any]]:
        """Several frames at once; override to run them through the network together.

        ``batch`` holds one ``image_list`` per frame; the result holds one output list per frame.
        """
        return [self.inference(image_list) for image_list in batch]

    def describe(self, model_id: str) -> dict[str, Any]:
        """The JSON description the catalog, Nuke panel and MLClient gateway are built from."""
        values = {n: getattr(self, n) for n in self.options}
        return {
            "name": model_id,
            "label": self.name,
            "version": str(self.version),
            "device": self.device,
            "batch_size": int(self.batch_size),
            "inputs": {k: int(v) for k, v in self.inputs.items()},
            "outputs": {k: (list(v) if isinstance(v, tuple | list) else int(v)) for k, v in self.outputs.items()},
            "options": describe_options(self.options, values, self.option_ranges),
            "buttons": [option_spec(n, bool(getattr(self, n))) for n in self.buttons],
        }

    @staticmethod
    def _plain(value: Any) -> Any:
        return value.value if isinstance(value, Choice) else value
