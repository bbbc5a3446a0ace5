"""RAFT optical flow: motion vectors to the next and the previous frame, as planes Nuke uses directly.

A ``window`` model with k = 1: frame f's window holds f-1, f, f+1. Per frame it writes
``forward.u``/``forward.v`` (motion from f to f+1) and ``backward.u``/``backward.v`` (from f to
f-1), in pixels, in **Nuke's convention: u positive to the right, v positive up** (torchvision's
RAFT gives y positive down, so v is its dy negated). VectorBlur and the motion-vector tools read
these planes as they are. The first frame has no previous frame and the last no next one: those
planes are zeros, and the sidecar and header say so (``mlfarm/flow``).

``rgba`` is a preview: the forward flow as a colour wheel (hue the direction, saturation the speed).

Every ordered pair of a batch's frames is computed once (RAFT is not symmetric, so f->f+1 and
f+1->f are two pairs) and all pairs go through the network together, in as many pairs a call as the
GPU's free memory takes (measured on the first frame of each size; ``MLFARM_FLOW_MEMORY_FRACTION``).
Frames go in as display-referred sRGB in [-1, 1], padded to what RAFT needs (sides a multiple of 8,
at least 128) and the flow cropped back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlfarm.models import BaseModel
from mlfarm.models.colour import linear_to_srgb, srgb_to_linear
from mlfarm.models.options import Choice
from mlfarm.models.variants import Variants

from .settings import FlowSettings
from .weights import ARCHITECTURES, fetch, load_state_dict, missing_message, path

log = logging.getLogger(__name__)

#: RAFT's smallest side (its correlation pyramid needs /8 feature maps of at least 16).
MIN_SIDE = 128


def nuke_planes(forward: Any, backward: Any, frame: Any, torch: Any) -> tuple[Any, Any]:
    """``(forward, backward)`` planes ``(H, W, 2)`` (u, v) in Nuke's convention from torchvision flows
    ``(2, H, W)`` (dx right, dy down); None where there is no such neighbour gives zeros the size of
    ``frame`` (any ``(..., H, W)`` tensor on the device)."""
    def convert(flow: Any) -> Any:
        if flow is None:
            return torch.zeros((*frame.shape[-2:], 2), dtype=torch.float32, device=frame.device)
        return torch.stack([flow[0], -flow[1]], dim=-1).float()

    return convert(forward), convert(backward)


def pad_size(height: int, width: int) -> tuple[int, int]:
    def side(v: int) -> int:
        return max(MIN_SIDE, -(-v // 8) * 8)

    return side(height), side(width)


@dataclass(frozen=True)
class Frame:
    """A frame ready for RAFT (``preprocess``): (3, H, W) sRGB in [-1, 1] on the model's device."""

    pixels: Any


class Model(BaseModel):
    settings_class = FlowSettings

    def __init__(self):
        super().__init__()
        self.name = "RAFT optical flow (torchvision, BSD)"
        self.version = "1"
        self.temporal = "window"
        self.window = 1
        self.arch = Choice("raft_large", tuple(ARCHITECTURES))
        self.updates = 12
        self.options = ("arch", "updates")
        self.option_ranges = {"updates": (1, 64)}
        self.inputs = {"image": 3}
        self.outputs = {"rgba": 4, "forward": ("u", "v"), "backward": ("u", "v")}
        self.device = "gpu"
        self.half_frames = True  # converted to float on the device, after the upload
        self.device_frames = True  # preprocess takes a frame decoded on the GPU as it is
        self.batch_size = 4
        self.gpu_turns = True  # a batch of pairs fills the GPU: processes sharing it take turns
        self.sidecar_json = True
        self._nets: Variants[Any] = Variants()  # per architecture
        self._pairs_per_call: dict[tuple[str, int, int], int] = {}

    # --- before anything runs ----------------------------------------------------------------
    def weight_variants(self) -> tuple[str, ...]:
        return tuple(ARCHITECTURES)

    def default_weight_variants(self) -> tuple[str, ...]:
        return ("raft_large",)

    def weight_licence(self, variant: str) -> str:
        return "BSD-3-Clause (torchvision)"

    def fetch_weights(self, variant: str, weights_dir: Any) -> Any:
        return fetch(variant, weights_dir)

    def check_ready(self, settings: Any) -> str | None:
        return missing_message(settings.weights_dir, self.arch.value)

    def weight_files(self, settings: Any) -> list[Any]:
        found = path(settings.weights_dir, self.arch.value)
        return [found] if found.is_file() else []

    def frame_metadata(self) -> dict[str, Any]:
        return {"mlfarm/flow": "pixels; u right, v up (Nuke); forward: to the next frame, backward: to the previous"}

    def load(self, device: str) -> None:
        import torch

        context = self.load_context(device)
        self.own = context.plugin_settings or FlowSettings()
        self.torch = torch
        self.torch_device = device
        self.weights_dir = context.settings.weights_dir
        self.planes_stay = context.outputs_on_device

    def unload(self) -> None:
        self._nets.clear()

    def _network(self) -> Any:
        arch = self.arch.value

        def build() -> Any:
            import torchvision.models.optical_flow as flow

            reason = missing_message(self.weights_dir, arch)
            if reason:
                raise RuntimeError(reason)
            net = getattr(flow, arch)(weights=None, progress=False)
            net.load_state_dict(load_state_dict(path(self.weights_dir, arch), self.torch))
            return net.to(self.torch_device).eval()

        return self._nets.get(arch, build)

    # --- frames ------------------------------------------------------------------------------------
    def preprocess(self, image_list: list[Any]) -> Frame:
        """On the I/O threads: the frame as RAFT takes it, (3, H, W) sRGB in [-1, 1] on the device,
        made on that thread's own CUDA stream, so the lane only runs the network."""
        from mlfarm.exr.gpu import finished_here

        torch = self.torch
        with finished_here(torch, self.torch_device), torch.inference_mode():
            linear = torch.as_tensor(image_list[0]).to(self.torch_device)[..., :3].permute(2, 0, 1).float()
            pixels = linear_to_srgb(linear, torch).clamp_(0.0, 1.0) * 2.0 - 1.0
        return Frame(pixels)

    def _prepare(self, item: Any) -> Any:
        """What ``preprocess`` made of a frame (a raw image list is prepared here), for this lane's stream."""
        frame = item if isinstance(item, Frame) else self.preprocess(item)
        if str(self.torch_device).startswith("cuda"):  # made on an I/O thread's stream
            from mlfarm.exr.gpu import used_here

            used_here([frame.pixels])
        return frame.pixels

    def flows(self, pairs: list[tuple[Any, Any]]) -> list[Any]:
        """RAFT's flow (2, H, W) for each (first, second) pair of prepared frames of one size: pixels,
        dx right and dy down, from the first frame to the second. The pairs go through together, as
        many a call as the measured memory allows.

        A call that runs out of GPU memory is not a failed frame: another process on the GPU (workers
        share one: ``MLFARM_WORKERS_PER_GPU``) can take memory after this one measured what fits, or
        measure at the same moment. The call is made again with half the pairs, and that size is kept.
        """
        torch = self.torch
        height, width = pairs[0][0].shape[-2:]
        key = (self.arch.value, height, width)
        net = self._network()
        out: list[Any] = []
        rest = list(pairs)
        while rest:
            most = self._batch_for(height, width)
            calls = -(-len(rest) // most)
            per_call = -(-len(rest) // calls)  # evenly: 8 pairs at most 6 a call go as 4 + 4, not 6 + 2
            try:
                flow = self._call(net, rest[:per_call], height, width)
            except torch.OutOfMemoryError:
                if per_call == 1:
                    raise
                self._pairs_per_call[key] = per_call // 2
                log.warning("flow: out of GPU memory at %d pairs a call (%dx%d); %d from now on", per_call, width,
                            height, per_call // 2)
                if str(self.torch_device).startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            out.extend(flow.unbind(0))
            rest = rest[per_call:]
        return out

    def _call(self, net: Any, group: list[tuple[Any, Any]], height: int, width: int) -> Any:
        """One network call over ``group``'s pairs, padded to what RAFT takes and cropped back."""
        torch = self.torch
        ph, pw = pad_size(height, width)
        with torch.inference_mode():
            first = torch.stack([a for a, _ in group])
            second = torch.stack([b for _, b in group])
            pad = (0, pw - width, 0, ph - height)
            if pad != (0, 0, 0, 0):
                f = torch.nn.functional
                first, second = f.pad(first, pad, mode="replicate"), f.pad(second, pad, mode="replicate")
            return net(first, second, num_flow_updates=int(self.updates))[-1][..., :height, :width]

    def _batch_for(self, height: int, width: int) -> int:
        """Pairs a call: on a GPU, from one pair's measured peak memory and the free memory (then as
        ``flows`` lowered it); elsewhere ``batch_size`` unless lowered."""
        key = (self.arch.value, height, width)
        if not str(self.torch_device).startswith("cuda"):
            return self._pairs_per_call.get(key, int(self.batch_size))
        if key not in self._pairs_per_call:
            torch = self.torch
            frame = torch.zeros((3, height, width), device=self.torch_device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self._pairs_per_call[key] = 1  # measure with one pair
            self.flows([(frame, frame)])
            per_pair = max(1, torch.cuda.max_memory_allocated() - base)
            free, _ = torch.cuda.mem_get_info()
            fits = int(free * float(self.own.flow_memory_fraction) // per_pair)
            self._pairs_per_call[key] = max(1, min(int(self.own.flow_max_batch), fits))
        return self._pairs_per_call[key]

    def _preview(self, flow: Any, frame: Any) -> Any:
        """A viewable rgba: the forward flow as torchvision's colour wheel (hue: direction, saturation:
        speed), as scene-linear values so Nuke's sRGB viewer shows those colours; black without a next frame."""
        torch = self.torch
        if flow is None:
            rgb = torch.zeros((*frame.shape[-2:], 3), device=frame.device)
        else:
            from torchvision.utils import flow_to_image

            rgb = srgb_to_linear(flow_to_image(flow.float()).permute(1, 2, 0).float() / 255.0, torch)
        return torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)

    def infer_batch(self, batch: list[Any]) -> list[list[Any]]:
        """``batch``: windows (``.frame``, ``.frames`` = [f-1, f, f+1] as read, clamped, ``.items``)."""
        torch = self.torch
        prepared: dict[int, Any] = {}
        wanted: list[tuple[int, int]] = []
        for w in batch:
            for f, item in zip(w.frames, w.items):
                if f not in prepared:
                    prepared[f] = self._prepare(item)
            prev, this, nxt = w.frames
            for pair in ((this, nxt), (this, prev)):
                if pair[0] != pair[1] and pair not in wanted:
                    wanted.append(pair)
        by_size: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for pair in wanted:
            by_size.setdefault(tuple(prepared[pair[0]].shape), []).append(pair)
        flows: dict[tuple[int, int], Any] = {}
        for pairs in by_size.values():
            flows.update(zip(pairs, self.flows([(prepared[a], prepared[b]) for a, b in pairs])))
        out = []
        for w in batch:
            prev, this, nxt = w.frames
            forward, backward = nuke_planes(flows.get((this, nxt)), flows.get((this, prev)), prepared[this], torch)
            preview = self._preview(flows.get((this, nxt)), prepared[this])
            planes = [preview, forward, backward]
            if not self.planes_stay:
                planes = [p.cpu().numpy() for p in planes]
            notes = {"frame": w.frame, "next": nxt if nxt != this else None, "previous": prev if prev != this else None}
            if notes["next"] is None:
                notes["forward"] = "zeros: no next frame"
            if notes["previous"] is None:
                notes["backward"] = "zeros: no previous frame"
            out.append([*planes, notes])
        return out
