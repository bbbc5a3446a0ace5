"""Where Depth Anything V2's weights come from: a Hugging Face folder, never a download while a job runs.

``mlfarm models fetch depth --size small`` saves the published ``transformers`` checkpoint under
``MLFARM_WEIGHTS_DIR/depth-anything-v2-<size>/`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), the layout ``save_pretrained`` writes, which is also what a studio
copies in by hand on a machine without internet.
"""

from __future__ import annotations

from pathlib import Path

#: Size -> (Hugging Face repository, licence). Only small may be used commercially.
SIZES: dict[str, tuple[str, str]] = {
    "small": ("depth-anything/Depth-Anything-V2-Small-hf", "Apache-2.0"),
    "base": ("depth-anything/Depth-Anything-V2-Base-hf", "CC-BY-NC-4.0 (non-commercial)"),
    "large": ("depth-anything/Depth-Anything-V2-Large-hf", "CC-BY-NC-4.0 (non-commercial)"),
}


def folder(weights_dir: Path | str, size: str) -> Path:
    return Path(weights_dir) / f"depth-anything-v2-{size}"


def missing_message(weights_dir: Path | str, size: str) -> str | None:
    """Why the weights of ``size`` cannot be loaded, or None when they are there."""
    where = folder(weights_dir, size)
    if (where / "config.json").is_file():
        return None
    repo, licence = SIZES[size]
    return (f"no Depth Anything V2 {size} weights: looked for {where}/config.json. Get them with `mlfarm models "
            f"fetch depth --size {size}` on a machine with internet ({repo}, licence {licence}), or copy a "
            f"save_pretrained folder there")


def fetch(size: str, weights_dir: Path | str) -> Path:
    """Download ``size`` from the Hugging Face Hub into its folder under ``weights_dir``."""
    from huggingface_hub import snapshot_download

    repo, licence = SIZES[size]
    dest = folder(weights_dir, size)
    snapshot_download(repo, local_dir=str(dest),
                      allow_patterns=["config.json", "model.safetensors", "preprocessor_config.json"])
    (dest / "LICENSE-NOTE.txt").write_text(f"{repo}: licence {licence}\n")
    return dest
