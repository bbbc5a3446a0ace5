"""``BaseModel``: the authoring surface of a model plugin.

It keeps nuke-ML-server's surface (``name``, ``options``, ``buttons``, ``inputs``, ``outputs``,
``get_*``/``set_*`` and ``inference(image_list)``) so existing models port with an import change,
and adds what a farm needs: multiple-choice options, value ranges, a version, the device it wants,
lazy loading once per worker process, and a batch entry point.

Rules for plugin authors (they keep the catalog cheap): ``__init__`` only declares; import torch and
load weights in ``load()``, which the worker calls once, on first use.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mlfarm.tensors import is_tensor  # noqa: F401  (plugins import it from here)

from .context import LoadContext
from .options import Choice, describe_options, option_spec


class InputError(ValueError):
    """A frame this model cannot take (e.g. too few channels); the message is the artist's reason."""


class BaseModel:
    #: The plugin's own settings group, a ``mlfarm.settings.PluginSettings`` subclass (e.g. Mask
    #: R-CNN's ``mrcnn_*``); the worker reads it at load time into ``context.plugin_settings``.
    settings_class: Any = None
    #: What a worker must have to run this model (broker/requirements.py): plain tags (``"80gb"``)
    #: or comparisons on worker facts (``"gpu_memory_gb>=24"``). Published in the catalog and merged
    #: into every job's requirement at submission, so its chunks only reach workers that meet it.
    requires: tuple[str, ...] = ()

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
        # True: each batch fills the GPU by itself (compute and memory), so batches of such models run
        # one at a time on a GPU, across the worker processes sharing it, and the memory one cached is
        # given back before the next (worker/gpu_turns.py). For models like RAFT; the default suits
        # models whose batches leave gaps that another process's batch fills.
        self.gpu_turns = False
        # True: frames reach preprocess as read, with no copy on the I/O thread: possibly a strided
        # view of the file's float32 channels. For a preprocess that copies them anyway, e.g. into
        # pinned memory for the GPU.
        self.raw_frames = False
        # True: a plate stored as half reaches preprocess as float16 (float data stays float32), for a
        # model that converts frames on its device: the host decodes without widening them and uploads
        # half the bytes. False: always float32.
        self.half_frames = False
        # True: preprocess also takes a frame already decoded on ``torch_device`` (a tensor there): a
        # GPU worker with nvCOMP then decodes zip plates on the GPU (``Settings.exr_gpu_decode``).
        self.device_frames = False
        self.sidecar_json = False  # True: non-image results are also written as <frame>.json beside each frame
        # How the model sees time (mlfarm.temporal): "frames" (independent frames, batched), "window"
        # (infer_batch gets a mlfarm.temporal.Window per frame: frames f-window .. f+window) or
        # "sequence" (start_sequence, then step() frame by frame in order, carrying state).
        self.temporal = "frames"
        self.window = 0
        self.promptable = False  # True: jobs carry prompts (mlfarm.prompts), and need them
        self.context: LoadContext | None = None  # set by setup(), before load()

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
    def with_options(self, options: Mapping[str, Any]) -> BaseModel:
        """This model set up with ``options`` (options and buttons, validated for it), for one piece
        of work: a chunk, an MLClient frame, a readiness check.

        Options travel with the work (as Triton passes parameters with each request) instead of
        staying as state on the one warm instance. The view holds what ``set_options`` and
        ``set_buttons`` set; everything else (weights, device state, caches, counters) it reads
        from and writes to the warm instance. This is the one adapter for plugins written in
        nuke-ML-server's style, whose methods read their options from attributes.
        """
        model, earlier = self, {}
        if type(self) is OptionsView:  # a view of a view: the new options on top of this view's
            model = object.__getattribute__(self, "_model")
            earlier = object.__getattribute__(self, "_own")
        scratch = copy.copy(model)
        vars(scratch).update(earlier)
        scratch.set_options({k: v for k, v in options.items() if k in model.options})
        scratch.set_buttons({k: v for k, v in options.items() if k in model.buttons})
        shared = vars(model)
        own = {k: v for k, v in vars(scratch).items() if k not in shared or shared[k] is not v}
        return OptionsView(model, own)  # type: ignore[return-value]

    def setup(self, context: LoadContext) -> None:
        """How the worker loads the model: keeps ``context`` (device, whether outputs may stay on
        it, the settings and the plugin's own group) for ``load()`` to read, then calls it."""
        self.context = context
        self.load(context.device)

    def load_context(self, device: str) -> LoadContext:
        """``self.context``, or for a model loaded by hand (a test, a benchmark) the context the
        worker would give it on ``device``."""
        return self.context if self.context is not None else LoadContext.for_model(self, device)

    def weight_variants(self) -> tuple[str, ...]:
        """The weights ``fetch_weights`` can download (e.g. architectures): what ``mlfarm models
        fetch NAME`` offers. Empty (the default): nothing to fetch."""
        return ()

    def default_weight_variants(self) -> tuple[str, ...]:
        """What ``mlfarm models fetch NAME`` downloads when no variant is named: by default all."""
        return self.weight_variants()

    def weight_licence(self, variant: str) -> str:
        """The licence of ``variant``'s weights, said when they are fetched ("" when unknown)."""
        return ""

    def fetch_weights(self, variant: str, weights_dir: Any) -> Any:
        """Download ``variant``'s weights into ``weights_dir``; returns the file's path. Only on
        request (``mlfarm models fetch``): nothing is downloaded while a job runs."""
        raise NotImplementedError(f"{type(self).__name__} has no downloadable weights")

    def weight_files(self, settings: Any) -> list[Any]:
        """The files whose bytes decide this view's outputs besides its code and options (its
        weights, for its current options), under ``settings``. The frame cache keys cover their
        content (``mlfarm.content_keys``): a re-fetched or retrained file makes frames render
        again. Declare them, or bump ``version`` when they change. Must stay cheap (no loading)."""
        return []

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

    # --- models that see time, and prompts ---------------------------------------------
    def outputs_for(self, prompts: Any) -> dict[str, int | tuple[str, ...]]:
        """The output planes of a job with these prompts (``mlfarm.prompts.Prompts`` or None): by
        default the model's ``outputs``; a promptable model may add a plane per named object."""
        return self.outputs

    def frame_metadata(self) -> dict[str, Any]:
        """Header attributes written into every output EXR of a job (e.g. what a data plane holds),
        with this view's options."""
        return {}

    def start_sequence(self, direction: str, prompts: Any, seed: Any = None) -> Any:
        """A ``sequence`` model's state for one stream: one shot in one direction ("forward" or
        "backward"), with the job's ``prompts``. ``seed`` (a ``mlfarm.temporal.Seed``: the planes this
        model wrote on the frame before, and that frame's input) is given when the stream resumes
        after that frame, e.g. on another worker; None starts from the prompts.

        The state belongs to the stream, not to the model: one warm model serves several at once.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a sequence model")

    def step(self, state: Any, frame: int, item: Any, prompts: list[Any]) -> list[Any]:
        """One frame of a stream, in order: ``item`` is what ``preprocess`` made of the frame,
        ``prompts`` the ``KeyPrompt``s given on it. Returns the frame's outputs as ``infer_batch``
        does for one frame (images in ``outputs_for`` order, then non-image results)."""
        raise NotImplementedError(f"{type(self).__name__} is not a sequence model")

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
            "temporal": self.temporal,
            "window": int(self.window),
            "promptable": bool(self.promptable),
            "requires": [str(r) for r in self.requires],
        }

    @staticmethod
    def _plain(value: Any) -> Any:
        return value.value if isinstance(value, Choice) else value


class OptionsView:
    """A warm model seen with one piece of work's option values (``BaseModel.with_options``).

    Attribute reads find the view's own values first, then the model's; methods run with the view
    as ``self``. Writes to an option go to the view, any other write to the model, so state the
    plugin keeps (a network built on first use, a counter) stays shared by every view.
    """

    __slots__ = ("_model", "_own")

    def __init__(self, model: BaseModel, own: dict[str, Any]) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_own", own)

    def __getattribute__(self, name: str) -> Any:
        own = object.__getattribute__(self, "_own")
        if name in own:
            return own[name]
        model = object.__getattribute__(self, "_model")
        cls = type(model)
        if name == "__class__":
            return cls  # isinstance() and super() see the plugin's class
        found = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if found is not None and (hasattr(found, "__set__") or hasattr(found, "__delete__")):
            return found.__get__(self, cls)  # a property: computed from the view
        if name in vars(model):
            return vars(model)[name]
        if hasattr(found, "__get__"):
            return found.__get__(self, cls)  # a method, bound to the view
        return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        own = object.__getattribute__(self, "_own")
        if name in own:
            own[name] = value
        else:
            setattr(object.__getattribute__(self, "_model"), name, value)

    def __repr__(self) -> str:
        return "<{} with options {}>".format(object.__getattribute__(self, "_model"),
                                             object.__getattribute__(self, "_own"))
