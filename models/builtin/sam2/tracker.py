"""SAM 2 video propagation on Hugging Face ``transformers``: one loaded model, many streaming sessions.

Chosen over Meta's ``sam2`` package because ``transformers`` is already the project's library for
video and depth models, loads ``save_pretrained`` folders offline, and its streaming session keeps
all tracking state outside the model: one warm model serves several shots at once, each through
its own :class:`Session` (checked: interleaved sessions give bit-identical masks to solo runs).

What the streaming session does not do by itself, this module does:

- **Bounded memory.** The session keeps every frame's pixels and outputs. After each frame we drop
  what SAM 2 can no longer look at (its pixels once encoded; per-object outputs older than
  ``max(num_maskmem, max_object_pointers_in_encoder)`` frames; full-size masks, used only inside the
  forward call). Masks are bit-identical with and without this, and a 2,000-frame shot stays flat.
- **Several objects prompted on one frame.** ``add_inputs_to_inference_session`` replaces the list
  of objects with new inputs, so each object's prompt is added and run before the next one's.
- **Direction.** A backward pass feeds frames in descending order; SAM 2 only uses relative frame
  offsets, so both directions stream with frame indices 0, 1, 2... in processing order.
- **Resumption.** A session can start from masks (``seed``), which SAM 2 takes as a mask prompt and
  returns unchanged on that frame: a sequence resumes from the last mask it wrote.

Frames reach :meth:`Session.step` as display-referred RGB in 0..1 (HxWx3 float32 numpy arrays or
torch tensors); masks come back at the frame's own size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlfarm.prompts import KeyPrompt

log = logging.getLogger(__name__)


@dataclass
class FrameMasks:
    """One frame's result: per object, mask logits at the frame's size, presence score and predicted IoU."""

    object_ids: list[int]
    logits: Any  # float tensor (objects, H, W) on the model's device; > 0 is the object
    scores: Any  # object presence, a tensor (objects,): sigmoid of SAM 2's object score logit (> 0.5: present)
    ious: list[Any]  # SAM 2's own estimate of each mask's IoU (0-d tensors), None where it gave none

    @property
    def masks(self) -> Any:
        return self.logits > 0


class Sam2Tracker:
    """A SAM 2 video model and its processor loaded from a ``save_pretrained`` folder."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: str = "float32", cuda_graphs: bool = True):
        import torch
        from transformers import Sam2VideoModel, Sam2VideoProcessor

        self.torch = torch
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.model = Sam2VideoModel.from_pretrained(str(folder), local_files_only=True, dtype=self.dtype)
        self.model.to(device).eval()
        self.processor = Sam2VideoProcessor.from_pretrained(str(folder), local_files_only=True)
        ip = self.processor.image_processor
        #: The image processor's resize and normalisation, done on the device by Session._pixels.
        self.square = (int(ip.size["height"]), int(ip.size["width"]))
        self.mean = torch.tensor(ip.image_mean, device=device).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(3, 1, 1)
        cfg = self.model.config
        #: How far back SAM 2 looks: older per-frame outputs are dropped.
        self.history = max(int(cfg.num_maskmem), int(getattr(cfg, "max_object_pointers_in_encoder", 16)))
        from mlfarm.models.cuda_graphs import GraphedFunction

        #: The image encoder, replayed as a CUDA graph on a GPU (its few hundred kernels in one call:
        #: a stream is bound by the host's time per frame, not the GPU's); eager elsewhere.
        self.encoder = GraphedFunction(self._features, enabled=cuda_graphs)
        self._ious = threading.local()  # the mask decoder's IoU estimates, per calling thread
        self.model.mask_decoder.register_forward_hook(self._capture_iou)

    def _capture_iou(self, module: Any, inputs: Any, output: Any) -> None:
        calls = getattr(self._ious, "calls", None)
        if calls is not None and len(output) > 1:
            calls.append(output[1].detach().float().amax(-1).flatten())

    def _features(self, pixels: Any) -> tuple[list[Any], list[Any]]:
        """The image encoder's outputs SAM 2's tracking reads, for a batch ``(B, 3, S, S)``: the
        feature maps and their position encodings, as ``get_image_features`` gives them."""
        out = self.model.get_image_features(pixels, return_dict=True)
        return list(out.fpn_hidden_states), list(out.fpn_position_encoding)

    def features(self, pixels: Any) -> dict[str, Any]:
        """One frame's ``(3, S, S)`` features as the session caches them. Copies: a graph's outputs are
        its own buffers, overwritten by the next replay on this thread."""
        feats, pos = self.encoder(pixels[None])
        if self.encoder.enabled and pixels.is_cuda:
            feats, pos = [f.clone() for f in feats], [p.clone() for p in pos]
        return {"vision_feats": feats, "vision_pos_embeds": pos}

    def session(self) -> Session:
        """A new streaming session: one shot, one direction."""
        return Session(self)


class Session:
    """The tracking state of one shot in one direction; frames go in one at a time, in order."""

    def __init__(self, tracker: Sam2Tracker):
        self.tracker = tracker
        self.state = tracker.processor.init_video_session(inference_device=tracker.device, dtype=tracker.dtype)
        self.index = 0  # frames processed: SAM 2's frame index of the next frame
        self.objects: set[int] = set()

    def _pixels(self, image: Any) -> tuple[Any, list[int]]:
        """The network's input for an HxWx3 display-referred frame (0..1), made on the model's device:
        resized to the model's square size and normalised, as its image processor does (bilinear,
        antialiased; checked against the processor in tests), without the processor's host round trip."""
        torch = self.tracker.torch
        t = image if isinstance(image, torch.Tensor) else torch.from_numpy(image)
        t = t[..., :3].to(self.tracker.device, non_blocking=True).permute(2, 0, 1).float().clamp_(0.0, 1.0)
        size = [int(t.shape[1]), int(t.shape[2])]
        square = torch.nn.functional.interpolate(t[None], size=self.tracker.square, mode="bilinear",
                                                 align_corners=False, antialias=True)[0]
        pixels = (square - self.tracker.mean) / self.tracker.std
        return pixels.to(self.tracker.dtype), size

    def step(self, image: Any, prompts: Sequence[KeyPrompt] = (), seed: Mapping[int, Any] | None = None
             ) -> FrameMasks:
        """Track every object into this frame, taking ``prompts`` for it (new objects or corrections),
        or ``seed`` masks (object id -> HxW bool) to start from, first."""
        torch = self.tracker.torch
        processor = self.tracker.processor
        pixels, size = self._pixels(image)
        k = self.index
        inputs = [(oid, {"input_masks": torch.as_tensor(mask).bool()}) for oid, mask in sorted((seed or {}).items())]
        inputs += [(p.object_id, dict(_inputs(p), original_size=size)) for p in prompts]
        if not inputs and not self.objects:
            raise ValueError("SAM 2: no object to follow yet (the first frame needs prompts or seed masks)")
        ious: dict[int, float] = {}
        with torch.inference_mode():
            # The frame's features go into the session's cache first: the model finds them there.
            self.state.cache.cache_vision_features(k, self.tracker.features(pixels))
            # One object's inputs a call: the processor keeps only the last call's objects as "new".
            for oid, kwargs in inputs:
                processor.add_inputs_to_inference_session(self.state, frame_idx=k, obj_ids=[oid], **kwargs)
                self.objects.add(oid)
                out = self._run(pixels, k, ious)
            if not inputs:
                out = self._run(pixels, k, ious)
        logits = processor.post_process_masks([out.pred_masks], original_sizes=[size], binarize=False)[0][:, 0]
        ids = [int(i) for i in out.object_ids]
        scores = torch.sigmoid(out.object_score_logits.float()).flatten()  # on the device: no sync here
        self._prune(k)
        self.index += 1
        return FrameMasks(object_ids=ids, logits=logits, scores=scores, ious=[ious.get(i) for i in ids])

    def _run(self, pixels: Any, k: int, ious: dict[int, float]) -> Any:
        """One forward pass over frame ``k`` (streaming: SAM 2 looks only at frames before it).

        SAM 2 reruns the mask decoder once per object, in object order, except for objects that already
        have a prompted output on this frame and no new inputs; its IoU estimates are matched up so.
        """
        state = self.state
        order = [state.obj_idx_to_id(i) for i in range(state.get_obj_num())]
        rerun = [oid for i, oid in enumerate(order) if oid in state.obj_with_new_inputs
                 or k not in state.output_dict_per_obj[i]["cond_frame_outputs"]]
        self.tracker._ious.calls = []
        try:
            out = self.tracker.model(inference_session=state, frame=pixels, frame_idx=k)
            calls = self.tracker._ious.calls
        finally:
            self.tracker._ious.calls = None
        if len(calls) == len(rerun):
            ious.update({oid: c.max() for oid, c in zip(rerun, calls) if c.numel()})
        return out

    def _prune(self, k: int) -> None:
        """Drop what SAM 2 can no longer look at, so memory stays flat over thousands of frames."""
        state, keep = self.state, self.tracker.history
        state.processed_frames.pop(k, None)
        for outputs in state.output_dict_per_obj.values():
            outputs["non_cond_frame_outputs"].pop(k - keep, None)
            for frame_out in (*outputs["non_cond_frame_outputs"].values(), *outputs["cond_frame_outputs"].values()):
                frame_out.pop("high_res_masks", None)
        for tracked in state.frames_tracked_per_obj.values():
            tracked.pop(k - keep, None)


def _inputs(p: KeyPrompt) -> dict[str, Any]:
    """One object's prompt in the processor's nesting: [image][box][4], [image][object][point][2]."""
    out: dict[str, Any] = {}
    if p.box is not None:
        out["input_boxes"] = [[list(p.box)]]
    if p.points:
        out["input_points"] = [[[[pt.x, pt.y] for pt in p.points]]]
        out["input_labels"] = [[[1 if pt.positive else 0 for pt in p.points]]]
    return out
