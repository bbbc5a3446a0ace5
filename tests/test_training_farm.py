"""Training as farm jobs: real Redis, real `mlfarm worker` processes on the train queue, real files.

A run trained through `mlfarm train` shows its progress in `mlfarm status`, lands in the catalog,
and renders a shot closer to the ground truth than the plate; classify results reach the EXR
header; cancel and retry resume from the checkpoint; a run outlives the broker's visibility
timeout without being doubled, and a killed trainer's run is finished by another worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlclient as mc
import numpy as np
import OpenImageIO as oiio
from gateway_harness import GatewayProcess
from training_data import colour_transform, make_classify_data, make_img2img_data, textured, warm_or_cool

from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path
from mlfarm.models.training.logs import read_log
from mlfarm.models.training.runs import TrainConfig, list_checkpoints, run_dir
from mlfarm.training_jobs import submit_training

from conftest import write_exr

TRAIN_QUEUES = "interactive,gpu,cpu,train"
# Two shared cores: one torch thread per trainer. MLFARM_TEST_TRAIN_DEVICE=auto runs these tests'
# workers on a GPU where there is one (the harness's default is the CPU).
ONE_THREAD = {"MLFARM_TRAIN_THREADS": "1", "MLFARM_DEVICE": os.environ.get("MLFARM_TEST_TRAIN_DEVICE", "cpu")}
# Runs that must still be going when the test acts on them (cancel, kill, SIGTERM, time limit) are made
# this much longer where a GPU may train them (the CPU takes ~50 ms a step here, a GPU a few).
SLOW = 1 if ONE_THREAD["MLFARM_DEVICE"] == "cpu" else 50
ENDLESS = 5000  # crops per image in runs that are never meant to finish: thousands of steps an epoch
SMALL = ["--batch", "4", "--crop", "64", "--crops-per-image", "2", "--features", "8", "--lr", "3e-3"]


def steps(folder: Path) -> list[int]:
    return [int(r["step"]) for r in read_log(folder)]


def submit_endless_run(farm, name: str, seed: int):
    """A run that trains until it is stopped (cancel, kill, SIGTERM); returns the client and its job."""
    data = make_img2img_data(farm.root / "data", n_val=0)
    client = farm.farm()
    config = TrainConfig(name=name, template="img2img", data=str(data), epochs=3, batch=4, lr=1e-3,
                         crop=64, seed=seed, crops_per_image=ENDLESS, features=8)
    return client, submit_training(client, config)


def assert_resumed_past(farm, client, spec, name: str, killed_at: int, first: str, second) -> None:
    """The run, whose trainer ``first`` was killed at ``killed_at``, goes on on ``second`` from its
    checkpoint; then it is cancelled (the point was the hand-over) and its log is one unbroken run."""
    second.wait_log(f"training {name}", timeout=60)
    deadline = time.monotonic() + 60
    while client.status(spec.id).progress.get("worker", "").startswith(first) or \
            client.status(spec.id).progress["step"] < killed_at + 5:
        assert time.monotonic() < deadline, second.log()[-3000:]
        time.sleep(0.5)
    client.cancel(spec.id)
    assert farm.wait_job(spec.id, timeout=60).state == "cancelled"
    log_steps = steps(run_dir(farm.storage, name))
    assert log_steps == list(range(1, log_steps[-1] + 1)) and log_steps[-1] > killed_at
    assert "resuming from step" in second.log()


def test_train_img2img_with_the_cli_then_render_a_shot_with_it(farm) -> None:
    farm.env_overrides.update(ONE_THREAD)
    farm.start_worker(queues=TRAIN_QUEUES)
    data = make_img2img_data(farm.root / "data")
    proc = farm.cli("train", "--template", "img2img", "--data", str(data), "--epochs", "8", "--seed", "3",
                    "--name", "grade", *SMALL, "--wait", "--json", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "done" and status["counts"]["done"] == 8 and status["total"] == 8
    assert status["spec"]["kind"] == "train" and status["spec"]["queue"] == "train"
    progress = status["progress"]
    assert progress["step"] == progress["total_steps"] == 16 and progress["epoch"] == 8
    assert 0 < progress["loss"] < 0.1 and progress["val_loss"] is not None

    folder = run_dir(farm.storage, "grade")
    assert steps(folder) == list(range(1, 17))
    assert [s for s, _ in list_checkpoints(folder)][-1] == 16
    text = farm.cli("status", status["id"], check=True).stdout
    assert "8/8 epochs done" in text and "step 16/16" in text and "loss" in text

    models = json.loads(farm.cli("models", "--json", check=True).stdout)
    option = {o["name"]: o for o in models["grade"]["options"]}["checkpoint"]
    assert option["default"] == "newest" and "16" in option["choices"]

    # The run goes on with --resume (only --epochs may change); a fresh run of the same name is refused.
    base = ["train", "--template", "img2img", "--data", str(data), "--name", "grade"]
    proc = farm.cli(*base, "--epochs", "9")
    assert proc.returncode == 2 and "already exists with a checkpoint at step 16" in proc.stderr
    proc = farm.cli(*base, "--resume", "--epochs", "10", "--lr", "0.1")
    assert proc.returncode == 2 and "was trained with --lr 0.003" in proc.stderr
    proc = farm.cli(*base, "--resume", "--epochs", "10", "--wait", "--json", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["spec"]["frames"] == [9, 10] and resumed["progress"]["step"] == 20
    assert steps(folder) == list(range(1, 21))

    # A shot the run never saw, rendered as a batch job with the trained model.
    plates, truths = farm.storage / "plates", {}
    for f in range(1001, 1004):
        rgba = np.concatenate([textured(f, 60, 90), np.ones((60, 90, 1), np.float32)], axis=2)
        write_exr(plates / f"plate.{f:04d}.exr", rgba)
        truths[f] = (rgba, colour_transform(rgba[..., :3]))
    out = str(farm.storage / "sh010" / "grade" / "sh010_grade.####.exr")
    proc = farm.cli("submit", "--input", str(plates / "plate.####.exr"), "--frames", "1001-1003", "--model",
                    "grade", "--output", out, "--wait", "--json", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f, (plate, truth) in truths.items():
        got = read_image(frame_path(out, f)).rgba(4)
        before, after = np.abs(plate[..., :3] - truth).mean(), np.abs(got[..., :3] - truth).mean()
        assert after < 0.6 * before, (f, before, after)
        np.testing.assert_array_equal(got[..., 3], plate[..., 3])


def test_classify_job_writes_label_and_scores_into_the_exr_header(farm) -> None:
    farm.env_overrides.update(ONE_THREAD)
    farm.start_worker(queues=TRAIN_QUEUES)
    data = make_classify_data(farm.root / "data")
    client = farm.farm()
    config = TrainConfig(name="tone", template="classify", data=str(data), epochs=10, batch=4, lr=3e-3, crop=64,
                         seed=1, crops_per_image=2, features=8)
    spec = submit_training(client, config)
    status = farm.wait_job(spec.id, timeout=240)
    assert status.state == "done", status.summary()
    assert status.progress["val_accuracy"] == 1.0

    plates = farm.storage / "plates"
    for f, warm in ((1, True), (2, False)):
        write_exr(plates / f"shot.{f:04d}.exr", warm_or_cool(500 + f, warm, size=96))
    out = str(farm.storage / "sh020" / "tone.####.exr")
    job = client.submit("tone", str(plates / "shot.####.exr"), out, [1, 2])
    assert farm.wait_job(job.id).state == "done"
    for f, label in ((1, "warm"), (2, "cool")):
        inp = oiio.ImageInput.open(frame_path(out, f))
        objects = json.loads(inp.spec().getattribute("mlfarm/objects"))
        inp.close()
        assert objects[0]["label"] == label and set(objects[0]["scores"]) == {"cool", "warm"}
        np.testing.assert_allclose(read_image(frame_path(out, f)).rgba(3),
                                   read_image(str(plates / f"shot.{f:04d}.exr")).rgba(3), atol=1e-3)  # half

    # Interactively, through the MLClient gateway: the trainer published the model to the farm's catalog.
    gateway = GatewayProcess(farm.env, farm.root / "gateway.log", local=False).wait_ready()
    try:
        assert "tone" in {m.name for m in mc.info(gateway.port).r1.models}
        image = warm_or_cool(600, True, size=80)
        reply = mc.infer(gateway.port, mc.model_from_info(gateway.port, "tone"), [image])
        assert not reply.HasField("error"), reply.error.msg
        objects = {o.name: o for o in reply.r2.objects}
        assert objects["label"].values[0].string_attributes[0].values[0] == "warm"
        np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), image)
    finally:
        gateway.stop()


def test_refused_submissions_name_the_problem_and_queue_nothing(farm) -> None:
    data = make_img2img_data(farm.root / "data", n_train=2, n_val=0)
    small = data / "train" / "groundtruth" / "shot_01.exr"
    write_exr(small, np.zeros((40, 40, 3), np.float32))
    proc = farm.cli("train", "--template", "img2img", "--data", str(data), "--crop", "32")
    assert proc.returncode == 2
    assert str(small) in proc.stderr and str(data / "train" / "input" / "shot_01.png") in proc.stderr
    proc = farm.cli("train", "--template", "img2img", "--data", str(data), "--crop", "64", "--name", "blur")
    assert proc.returncode == 2 and "name of a model plugin" in proc.stderr
    proc = farm.cli("train", "--template", "img2img", "--data", str(data), "--name", "nothing", "--resume")
    assert proc.returncode == 2 and "no run 'nothing' to resume" in proc.stderr
    assert farm.farm().jobs() == []


def test_cancel_then_retry_resumes_from_the_checkpoint(farm) -> None:
    farm.env_overrides.update({**ONE_THREAD, "MLFARM_TRAIN_CHECKPOINT_INTERVAL": "1"})
    worker = farm.start_worker(queues=TRAIN_QUEUES)
    data = make_img2img_data(farm.root / "data", n_val=0)
    client = farm.farm()
    config = TrainConfig(name="long", template="img2img", data=str(data), epochs=40, batch=4, lr=3e-3, crop=64,
                         seed=2, crops_per_image=2 * SLOW, features=8)
    total = 40 * 2 * SLOW  # 4 images x crops / batch 4, for 40 epochs
    spec = submit_training(client, config)
    deadline = time.monotonic() + 120
    while client.status(spec.id).progress.get("step", 0) < 5:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    client.cancel(spec.id)
    status = farm.wait_job(spec.id)
    assert status.state == "cancelled", status.summary()
    folder = run_dir(farm.storage, "long")
    stopped_at = list_checkpoints(folder)[-1][0]
    assert 5 <= stopped_at < total and steps(folder)[-1] == stopped_at

    proc = farm.cli("retry", spec.id, "--wait", "--json", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["progress"]["step"] == total
    assert f"resuming from step {stopped_at}" in worker.log()
    assert steps(folder) == list(range(1, total + 1))  # one unbroken log: nothing trained twice, nothing lost


def test_long_run_is_not_redelivered_and_a_killed_trainer_is_resumed_elsewhere(farm) -> None:
    """Visibility timeout 12 s: the heartbeat keeps a 20 s+ run on its worker; SIGKILL hands it on."""
    farm.env_overrides.update({**ONE_THREAD, "MLFARM_FRAME_TIME_LIMIT": "3", "MLFARM_CHUNK_SLACK": "2",
                               "MLFARM_VISIBILITY_TIMEOUT": "12", "MLFARM_RESTORE_INTERVAL": "1",
                               "MLFARM_TRAIN_CHECKPOINT_INTERVAL": "1"})
    first = farm.start_worker(queues="train", name="first@test")
    client, spec = submit_endless_run(farm, "durable", seed=4)
    first.wait_log("training durable")
    second = farm.start_worker(queues="train", name="second@test")
    time.sleep(20)  # well past the visibility timeout and several restore sweeps
    assert client.status(spec.id).progress["worker"].startswith("first@test")
    assert "Task mlfarm.train[" not in second.log(), second.log()[-2000:]
    first.kill()
    killed_at = client.status(spec.id).progress["step"]

    assert_resumed_past(farm, client, spec, "durable", killed_at, "first@test", second)


def test_warm_shutdown_checkpoints_and_hands_the_run_on(farm) -> None:
    """SIGTERM: the trainer checkpoints, puts its task back, and the worker exits without finishing the run."""
    farm.env_overrides.update(ONE_THREAD)
    first = farm.start_worker(queues="train", name="first@test")
    client, spec = submit_endless_run(farm, "handover", seed=8)
    deadline = time.monotonic() + 60
    while client.status(spec.id).progress.get("step", 0) < 3:
        assert time.monotonic() < deadline, first.log()[-3000:]
        time.sleep(0.2)
    started = time.monotonic()
    first.stop(timeout=60)
    assert first.proc.returncode == 0 and time.monotonic() - started < 30
    folder = run_dir(farm.storage, "handover")
    stopped_at = list_checkpoints(folder)[-1][0]
    assert stopped_at >= 3 and steps(folder)[-1] == stopped_at  # checkpointed exactly where it stopped
    assert "back on the queue" in first.log()

    second = farm.start_worker(queues="train", name="second@test")
    second.wait_log(f"resuming from step {stopped_at}")
    client.cancel(spec.id)
    assert farm.wait_job(spec.id, timeout=60).state == "cancelled"


def test_time_limit_stops_with_a_checkpoint_and_says_how_to_resume(farm) -> None:
    farm.env_overrides.update({**ONE_THREAD, "MLFARM_TRAIN_TIME_LIMIT": "3"})
    farm.start_worker(queues=TRAIN_QUEUES)
    data = make_img2img_data(farm.root / "data", n_val=0)
    config = TrainConfig(name="limited", template="img2img", data=str(data), epochs=500, batch=4, lr=1e-3, crop=64,
                         seed=9, crops_per_image=2 * SLOW, features=8)
    spec = submit_training(farm.farm(), config)
    status = farm.wait_job(spec.id, timeout=120)
    assert status.state == "failed"
    stopped_at = list_checkpoints(run_dir(farm.storage, "limited"))[-1][0]
    reasons = {fs.reason for fs in status.failed_frames}
    assert reasons == {f"time limit of 3s reached at step {stopped_at} (checkpoint step-{stopped_at:08d}.safetensors); "
                       f"`mlfarm retry {spec.id}` resumes from it"}
    assert status.counts["done"] == stopped_at // (2 * SLOW) and status.progress["step"] == stopped_at


def test_a_killed_trainer_is_resumed_long_before_the_broker_would_redeliver_it(farm) -> None:
    """The broker left at its default visibility timeout (65 min): the dead trainer's heartbeat
    expiring is what hands the run on."""
    farm.env_overrides.update({**ONE_THREAD, "MLFARM_WORKER_DEAD_AFTER": "4", "MLFARM_TRAIN_CHECKPOINT_INTERVAL": "1"})
    first = farm.start_worker(queues="train", name="first@dead")
    client, spec = submit_endless_run(farm, "orphan", seed=5)
    first.wait_log("training orphan")
    deadline = time.monotonic() + 60
    while not list((run_dir(farm.storage, "orphan") / "checkpoints").glob("*.safetensors")):
        assert time.monotonic() < deadline, first.log()[-3000:]
        time.sleep(0.2)
    first.kill()
    killed_at = client.status(spec.id).progress["step"]

    second = farm.start_worker(queues="train", name="second@dead")
    assert_resumed_past(farm, client, spec, "orphan", killed_at, "first@dead", second)
    assert "which has sent no heartbeat" in second.log()
