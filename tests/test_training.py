"""The training templates in-process, on CPU: the loop, checkpoints, resume, seeding, data errors,
and a trained run as a catalog model. The farm side is in test_training_farm.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_data import colour_transform, make_classify_data, make_img2img_data, textured, warm_or_cool

from mlfarm.models.base import InputError
from mlfarm.models.catalog import Catalog
from mlfarm.models.training.checkpoints import load_checkpoint
from mlfarm.models.training.data import DataError, scan
from mlfarm.models.training.hooks import Hooks, Progress, Stopped
from mlfarm.models.training.logs import read_log
from mlfarm.models.training.loop import Trainer
from mlfarm.models.training.runs import TrainConfig, list_checkpoints, run_dir
from mlfarm.settings import Settings

from conftest import PLUGINS, write_exr


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores are shared by everyone: one torch thread trains faster here than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def img2img_config(data: Path, name: str = "cc", **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(epochs=6, batch=4, lr=3e-3, crop=64, seed=5, crops_per_image=2, features=8)
    values.update(kw)
    return TrainConfig(name=name, template="img2img", data=str(data), **values)


def weights(storage: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir(storage, name))[-1][1]).weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One img2img run shared by the tests that only read it: (storage root, data folder)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_img2img_data(root / "data")
    storage = root / "storage"
    Trainer(img2img_config(data, epochs=8), storage, keep_checkpoints=3).run()
    return storage, data


def test_loss_goes_down_checkpoints_and_logs(trained: tuple[Path, Path]) -> None:
    storage, _ = trained
    folder = run_dir(storage, "cc")
    rows = read_log(folder)
    per_epoch = 2  # 4 images x 2 crops / batch 4
    assert [int(r["step"]) for r in rows] == list(range(1, 8 * per_epoch + 1))
    first = np.mean([float(r["loss"]) for r in rows[:per_epoch]])
    last = np.mean([float(r["loss"]) for r in rows[-per_epoch:]])
    assert last < 0.75 * first, (first, last)
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 8 and val[-1] < val[0]
    # a checkpoint per epoch, step in the name, the 3 newest kept
    assert [s for s, _ in list_checkpoints(folder)] == [12, 14, 16]
    assert (folder / "checkpoints" / "step-00000016.safetensors").is_file()
    assert load_checkpoint(folder / "checkpoints" / "step-00000016.safetensors").step == 16
    assert json.loads((folder / "run.json").read_text())["seed"] == 5
    assert list((folder / "tensorboard").glob("events.out.tfevents.*")), "tensorboard is installed: event files"


class StopAfter(Hooks):
    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def step_done(self, progress: Progress) -> None:
        self.seen = progress.step

    def stop_reason(self) -> str | None:
        return "test stop" if self.seen >= self.step else None


def test_resume_mid_epoch_continues_from_its_step_and_seed_reproduces(tmp_path: Path) -> None:
    data = make_img2img_data(tmp_path / "data", n_val=0)
    storage = tmp_path / "storage"
    Trainer(img2img_config(data, "straight", epochs=3), storage).run()

    with pytest.raises(Stopped) as stopped:  # step 3 is in the middle of epoch 2
        Trainer(img2img_config(data, "resumed", epochs=3), storage, hooks=StopAfter(3)).run()
    assert stopped.value.progress.step == 3
    folder = run_dir(storage, "resumed")
    assert [s for s, _ in list_checkpoints(folder)] == [2, 3]
    progress = Trainer(img2img_config(data, "resumed", epochs=3), storage).run()
    assert progress.step == 6
    assert [int(r["step"]) for r in read_log(folder)] == [1, 2, 3, 4, 5, 6]

    a, b = weights(storage, "straight"), weights(storage, "resumed")
    for key in a:  # same seed, interrupted or not: the same network, bit for bit
        assert torch.equal(a[key], b[key]), key
    Trainer(img2img_config(data, "other_seed", epochs=3, seed=6), storage).run()
    c = weights(storage, "other_seed")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_data_errors_name_the_files(tmp_path: Path) -> None:
    data = make_img2img_data(tmp_path / "data", n_train=2, n_val=0)
    small = data / "train" / "input" / "shot_00.png"
    with pytest.raises(DataError, match="shot_00.png is 80x72, smaller than the 96x96 crop"):
        scan(data, "img2img", 96)

    write_exr(data / "train" / "groundtruth" / "shot_01.exr", np.zeros((64, 64, 3), np.float32))
    with pytest.raises(DataError) as err:
        scan(data, "img2img", 64)
    assert str(data / "train" / "input" / "shot_01.png") in str(err.value)
    assert str(data / "train" / "groundtruth" / "shot_01.exr") in str(err.value)
    assert "80x72" in str(err.value) and "64x64" in str(err.value)

    (data / "train" / "groundtruth" / "shot_01.exr").unlink()
    with pytest.raises(DataError, match=r"shot_01.png has no ground truth"):
        scan(data, "img2img", 64)
    assert small.exists()  # nothing of the user's is touched

    classes = tmp_path / "one_class"
    write_exr(classes / "train" / "warm" / "a.exr", warm_or_cool(1, True))
    with pytest.raises(DataError, match="at least two classes"):
        scan(classes, "classify", 64)
    with pytest.raises(DataError, match="no train/ folder"):
        scan(tmp_path / "nothing", "img2img", 64)


def test_jpeg_and_tiff_pairs_are_read_through_openimageio(tmp_path: Path) -> None:
    import OpenImageIO as oiio

    from mlfarm.models.training.data import load_rgb

    img = textured(3, 70, 66)
    for path, fmt in ((tmp_path / "train" / "input" / "a.jpg", oiio.UINT8),
                      (tmp_path / "train" / "groundtruth" / "a.tif", oiio.UINT16)):
        path.parent.mkdir(parents=True, exist_ok=True)
        out = oiio.ImageOutput.create(str(path))
        assert out.open(str(path), oiio.ImageSpec(66, 70, 3, fmt)), oiio.geterror()
        assert out.write_image(img)
        out.close()
    data = scan(tmp_path, "img2img", 64)
    [sample] = data.train
    assert (sample.image.path.name, sample.target.path.name) == ("a.jpg", "a.tif")
    jpeg, tiff = load_rgb(sample.image), load_rgb(sample.target)
    assert jpeg.shape == tiff.shape == (3, 70, 66)
    np.testing.assert_allclose(tiff, img.transpose(2, 0, 1), atol=1 / 65535)
    other = textured(4, 70, 66).transpose(2, 0, 1)
    assert np.abs(jpeg - img.transpose(2, 0, 1)).mean() < 0.3 * np.abs(jpeg - other).mean()  # lossy, same picture


def test_trained_run_is_a_catalog_model_with_a_checkpoint_option(trained: tuple[Path, Path]) -> None:
    storage, data = trained
    catalog = Catalog.from_settings(Settings(storage_root=storage, models_path=str(PLUGINS)))
    assert "cc" in catalog.names() and "blur" in catalog.names()
    desc = catalog.describe("cc")
    option = {o["name"]: o for o in desc["options"]}["checkpoint"]
    assert option["type"] == "choice" and option["default"] == "newest"
    assert option["choices"] == ["newest", "16", "14", "12"]
    assert desc["trained"]["template"] == "img2img"

    # Describing it needs no torch (the catalog, the CLI and Nuke list models cheaply).
    code = ("import sys, json; from mlfarm.models.catalog import Catalog; from mlfarm.settings import Settings;"
            f"d = Catalog.from_settings(Settings(storage_root={str(storage)!r})).describe('cc');"
            "print(json.dumps(['torch' in sys.modules, d['options'][0]['choices']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [False, ["newest", "16", "14", "12"]]

    model = catalog.entry("cc").create()
    model.load("cpu")
    plate = np.concatenate([textured(7, 90, 70), np.full((90, 70, 1), 0.5, np.float32)], axis=2)  # any size
    model.set_options({"checkpoint": "newest"})
    newest = model.infer_batch([[plate]])[0][0]
    assert newest.shape == (90, 70, 4)
    np.testing.assert_array_equal(newest[..., 3], plate[..., 3])  # alpha passes through
    truth = colour_transform(plate[..., :3])
    before, after = np.abs(plate[..., :3] - truth).mean(), np.abs(newest[..., :3] - truth).mean()
    assert after < 0.75 * before, (before, after)

    model.set_options({"checkpoint": "12"})
    older = model.infer_batch([[plate]])[0][0]
    assert not np.array_equal(older, newest)
    with pytest.raises(InputError, match="no checkpoint at step 3 .*12, 14, 16"):
        model.set_options({"checkpoint": "3"})


def test_classify_returns_label_and_scores(tmp_path: Path) -> None:
    data = make_classify_data(tmp_path / "data")
    storage = tmp_path / "storage"
    config = TrainConfig(name="tone", template="classify", data=str(data), epochs=10, batch=4, lr=3e-3, crop=64,
                         seed=1, crops_per_image=2, features=8)
    progress = Trainer(config, storage).run()
    assert progress.val_accuracy == 1.0, progress
    rows = read_log(run_dir(storage, "tone"))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    model = Catalog.from_settings(Settings(storage_root=storage)).entry("tone").create()
    assert model.describe("tone")["trained"]["classes"] == ["cool", "warm"]
    model.load("cpu")
    for warm in (True, False):
        image = warm_or_cool(999 if warm else 998, warm, size=100)
        out_image, result = model.infer_batch([[image]])[0]
        np.testing.assert_array_equal(out_image, image)  # the image passes through
        assert result["label"] == ("warm" if warm else "cool")
        assert set(result["scores"]) == {"cool", "warm"}
        assert result["score"] == max(result["scores"].values()) > 0.5
        assert abs(sum(result["scores"].values()) - 1) < 1e-4
