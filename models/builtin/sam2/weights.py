"""Where SAM 2.1's weights come from: a Hugging Face folder, never a download while a job runs.

``mlfarm models fetch sam2 --size base-plus`` saves Meta's SAM 2.1 checkpoint as published for
``transformers`` (Apache-2.0) under ``MLFARM_WEIGHTS_DIR/sam2.1-hiera-<size>/``: ``config.json``,
``model.safetensors`` and ``processor_config.json``, the layout ``save_pretrained`` writes.
"""

from __future__ import annotations

from pathlib import Path

#: Size -> Hugging Face repository (parameters: 39 M, 46 M, 81 M, 224 M).
SIZES: dict[str, str] = {
    "tiny": "facebook/sam2.1-hiera-tiny",
    "small": "facebook/sam2.1-hiera-small",
    "base-plus": "facebook/sam2.1-hiera-base-plus",
    "large": "facebook/sam2.1-hiera-large",
}


def folder(weights_dir: Path | str, size: str) -> Path:
    return Path(weights_dir) / f"sam2.1-hiera-{size}"


def missing_message(weights_dir: Path | str, size: str) -> str | None:
    """Why the weights of ``size`` cannot be loaded, or None when they are there."""
    where = folder(weights_dir, size)
    if (where / "config.json").is_file():
        return None
    return (f"no SAM 2.1 {size} weights: looked for {where}/config.json. Get them with `mlfarm models fetch sam2 "
            f"--size {size}` on a machine with internet ({SIZES[size]}), or copy a save_pretrained folder there")


def fetch(size: str, weights_dir: Path | str) -> Path:
    """Download ``size`` from the Hugging Face Hub into its folder under ``weights_dir``."""
    from huggingface_hub import snapshot_download

    dest = folder(weights_dir, size)
    snapshot_download(SIZES[size], local_dir=str(dest),
                      allow_patterns=["config.json", "model.safetensors", "processor_config.json",
                                      "preprocessor_config.json", "video_preprocessor_config.json"])
    return dest
