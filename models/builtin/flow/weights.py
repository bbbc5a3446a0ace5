"""Where RAFT's weights come from: torchvision's published state dicts, in MLFARM_WEIGHTS_DIR.

``mlfarm models fetch flow`` downloads them (hash-checked, like ``torch.hub``) where there is
internet; a machine without copies the files into ``MLFARM_WEIGHTS_DIR`` under the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Architecture -> (file name, torchvision weights enum, member). Trained on FlyingChairs + Things, then
#: Sintel, KITTI, HD1K and Things ("C_T_SKHT"): the general-purpose weights (large); small has C_T only.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "raft_large": ("raft_large_C_T_SKHT_V2-ff5fadd5.pth", "Raft_Large_Weights", "C_T_SKHT_V2"),
    "raft_small": ("raft_small_C_T_V2-01064c6d.pth", "Raft_Small_Weights", "C_T_V2"),
}


def path(weights_dir: Path | str, arch: str) -> Path:
    return Path(weights_dir) / ARCHITECTURES[arch][0]


def missing_message(weights_dir: Path | str, arch: str) -> str | None:
    where = path(weights_dir, arch)
    if where.is_file():
        return None
    return (f"no {arch} weights: looked for {where}. Get them with `mlfarm models fetch flow --arch {arch}` on a "
            f"machine with internet, or copy {where.name} from torchvision's model zoo into MLFARM_WEIGHTS_DIR")


def load_state_dict(file: Path, torch: Any) -> dict[str, Any]:
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RuntimeError(f"{file} holds no state dict")
    return state


def fetch(arch: str, weights_dir: Path | str) -> Path:
    import torch
    import torchvision.models.optical_flow as flow

    name, enum_name, member = ARCHITECTURES[arch]
    weights = getattr(getattr(flow, enum_name), member)
    if Path(weights.url).name != name:
        raise RuntimeError(f"torchvision now publishes {Path(weights.url).name}, mlfarm expects {name}")
    dest = path(weights_dir, arch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.is_file():
        torch.hub.download_url_to_file(weights.url, str(dest), hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
    return dest
