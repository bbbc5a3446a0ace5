"""Submitting from Nuke, end to end: the Nuke layer against a stand-in ``nuke`` module, with a real
farm (real Redis, real worker processes, real EXR files).

The stand-in (tests/nuke_stub/nuke.py) follows Nuke's documented API for what mlfarm calls, and
refuses knob access off the main thread, so progress must arrive through executeInMainThread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mlfarm.broker.frames import frame_path, to_printf
from mlfarm.client import SubmitError
from mlfarm.exr.io import read_image
from mlfarm.keys import frames_key, job_key
from mlfarm.nuke_submit.plan import PlanError
from mlfarm.settings import get_settings

from conftest import TESTS, make_plate, sample_pixels, write_exr

STUB = TESTS / "nuke_stub"
HALF = dict(rtol=1e-3, atol=1e-3)  # outputs' rgba is stored as half


@pytest.fixture
def nuke(monkeypatch):
    monkeypatch.syspath_prepend(str(STUB))
    import nuke as stub

    stub.reset()
    yield stub
    from mlfarm.nuke_submit import nuke_ui

    nuke_ui.WATCHERS.stop_all()
    stub.reset()


@pytest.fixture
def ui(nuke):
    from mlfarm.nuke_submit import nuke_ui

    return nuke_ui


@pytest.fixture
def farm_env(farm, monkeypatch):
    """The farm's settings in this process's environment, for code that connects on its own (menu commands)."""
    for key in [k for k in os.environ if k.startswith("MLFARM_")]:
        monkeypatch.delenv(key)
    for key, value in farm.env.items():
        if key.startswith("MLFARM_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFARM_NUKE_POLL_INTERVAL", "0.1")
    get_settings.cache_clear()
    yield farm
    get_settings.cache_clear()


def pump(nuke, done, timeout=90.0, seen=None):
    """Run Nuke's main-thread queue until ``done()``; ``seen`` collects the label after each delivery."""
    deadline = time.monotonic() + timeout
    while True:
        if nuke.process_events() and seen is not None:
            seen.append(seen_label(nuke))
        if done():
            return
        if time.monotonic() > deadline:
            watchers = {j: (w.is_alive(), w.last, w.last_wait) for j, w in ui_watchers()._by_job.items()}
            raise TimeoutError(f"not done after {timeout}s; labels seen: {seen}; now: {seen_label(nuke)!r}; "
                               f"watchers: {watchers}")
        time.sleep(0.02)


def ui_watchers():
    from mlfarm.nuke_submit.nuke_ui import WATCHERS

    return WATCHERS


def seen_label(nuke):
    reads = [n for n in nuke.allNodes("Read") if n.knob("mlfarm_job") is not None]
    return reads[-1]["label"].value() if reads else ""


def done_count(label: str) -> int:
    return int(label.splitlines()[2].split("/")[0])


def test_submit_a_read_on_shared_storage_creates_a_results_read_that_follows_the_job(farm, nuke, ui):
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    frames = list(range(1001, 1007))
    plate = make_plate(farm.storage / "plätes" / "sh 010", frames)
    nuke.root()["name"].setValue("/jobs/show/sh010_comp_v003.nk")
    source = nuke.nodes.Read(file=to_printf(plate), first=1001, last=1006, raw=False, colorspace="ACES - ACEScg")
    source.setXYpos(100, 200)

    sub = ui.submit(source, "slow", {"seconds": 0.25, "mode": "invert"}, chunk=2, farm=f)

    assert not sub.rendered_first and sub.input == to_printf(plate)
    expected_out = str(farm.storage / "sh010_comp" / "ml" / "slow" / "v001" / "sh010_comp_slow_v001.####.exr")
    assert sub.spec.output == expected_out and sub.spec.frames == frames
    read = sub.read
    assert read.Class() == "Read" and read.name() == "ML_slow_v001"
    assert read["file"].value() == to_printf(expected_out)
    assert (read["first"].value(), read["last"].value()) == (1001, 1006)
    assert (read["origfirst"].value(), read["origlast"].value()) == (1001, 1006)
    assert read["raw"].value() is False and read["colorspace"].value() == "ACES - ACEScg"  # as the plate
    assert read.ypos() == 200 and read.xpos() > 100 + source.screenWidth()  # beside the source, to its right
    assert read["mlfarm_job"].value() == sub.job_id
    assert read["label"].value().splitlines()[:2] == [f"mlfarm {sub.job_id}", "slow v1"]

    again = ui.submit(source, "passthrough", frames="1001", farm=f, watch=False)  # while the first still runs
    assert "/passthrough/v001/" in again.spec.output
    third = ui.submit(source, "slow", {"seconds": 0}, frames="1001", farm=f, watch=False)
    assert third.spec.output == expected_out.replace("v001", "v002")  # never the running job's folder
    assert third.read.name() == "ML_slow_v002" and f"mlfarm {third.job_id}" in third.read["label"].value()
    # Each results Read has a place of its own, level with the source: none lands on another node.
    rects = [(n.xpos(), n.ypos(), n.screenWidth(), n.screenHeight()) for n in nuke.allNodes()]
    assert len(rects) == 4 and len(set(rects)) == 4
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3])
    assert {r.ypos() for r in (read, again.read, third.read)} == {200}
    nuke.delete(again.read)
    nuke.delete(third.read)

    labels = []
    pump(nuke, lambda: "[done]" in read["label"].value(), seen=labels)
    assert read["label"].value().splitlines()[2] == "6/6 done [done]"
    assert any(0 < done_count(lab) < 6 for lab in labels), labels  # progress shown while it ran
    assert read["reload"].presses >= 2  # reloaded as frames landed, not only at the end
    assert read["mlfarm_failures"].value() == "no failed frames"
    assert {"rgba.red", "rgba.alpha", "extra.id"} <= set(read.channels())  # every layer is in the menu
    for fr in (1001, 1006):
        np.testing.assert_allclose(read.pixels(fr)[..., :3], 1.0 - sample_pixels(fr)[..., :3], **HALF)


def test_panel_renders_a_non_read_node_first_then_submits(farm, nuke, ui):
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    local = farm.root / "local plates"  # not on the farm's storage: workers cannot read it
    plate = make_plate(local, range(1001, 1006))
    read = nuke.nodes.Read(file=plate, first=1001, last=1005)
    grade = nuke.nodes.Grade(multiply=2.0)
    grade.setInput(0, read)

    panel = ui.SubmitPanel(grade, f)
    published = sorted(f.catalog(include_local=False))
    assert panel.model.values() == published and {"blur", "passthrough", "slow"} <= set(published)
    nuke.user_sets(panel, "model", "slow")
    knobs = panel.knobs()
    assert knobs["opt_mode"].values() == ["copy", "invert"] and knobs["opt_seconds"].value() == 0.5
    assert "/slow/v001/" in panel.output.value()
    nuke.user_sets(panel, "model", "passthrough")  # the option knobs follow the model
    assert not [k for k in panel.knobs() if k.startswith("opt_")]
    assert "/passthrough/v001/" in panel.output.value()
    assert not panel.custom.enabled()
    nuke.user_sets(panel, "frame_range", "custom")
    assert panel.custom.enabled()
    nuke.user_sets(panel, "custom_frames", "1001-1005x2")
    assert panel.frames() == [1001, 1003, 1005]
    nuke.user_sets(panel, "chunk", 2)

    sub = panel.submit()

    assert sub.rendered_first
    assert nuke.executed == [(nuke.executed[0][0], 1001, 1005, 2)]
    assert nuke.allNodes("Write") == []  # the temporary Write is gone
    renders = farm.storage / "untitled" / "ml" / "_renders"
    assert Path(sub.input).parent.parent == renders
    rendered = read_image(frame_path(sub.input, 1003))
    assert rendered.channels == ["R", "G", "B", "A"] and rendered.pixels.dtype == np.float32
    assert sorted(os.listdir(Path(sub.input).parent)) == ["Grade1.1001.exr", "Grade1.1003.exr", "Grade1.1005.exr"]
    assert sub.read["raw"].value() is True  # rendered raw, read back raw
    assert (sub.read["first"].value(), sub.read["last"].value()) == (1001, 1005)

    pump(nuke, lambda: "[done]" in sub.read["label"].value())
    assert sub.read["label"].value().splitlines()[2] == "3/3 done [done]"
    expected = sample_pixels(1005)
    expected[..., :3] *= 2.0
    np.testing.assert_allclose(sub.read.pixels(1005), expected, **HALF)

    # Missing frames of a Read are reported before anything is rendered or queued...
    os.remove(frame_path(plate, 1004))
    before = len(f.jobs())
    with pytest.raises(PlanError, match="1 of 5 input frames are missing: 1004"):
        ui.submit(read, "passthrough", frames="1001-1005", farm=f, watch=False)
    assert len(nuke.executed) == 1 and len(f.jobs()) == before
    # ...and a render that fails further down says so, queues nothing and leaves no partial render behind.
    with pytest.raises(PlanError, match="rendering Grade1 to EXR for the farm failed, nothing was submitted: .*1004"):
        ui.submit(grade, "passthrough", frames="1001-1005", farm=f, watch=False)
    assert len(f.jobs()) == before and nuke.allNodes("Write") == []
    assert sorted(os.listdir(renders)) == [Path(sub.input).parent.name]
    # A submission the farm refuses after the render (here: the chunk size) removes that render too.
    with pytest.raises(SubmitError, match="could outlast the broker's redelivery timeout"):
        ui.submit(grade, "passthrough", frames="1001-1003", chunk=10000, farm=f, watch=False)
    assert len(nuke.executed) == 3 and len(f.jobs()) == before
    assert sorted(os.listdir(renders)) == [Path(sub.input).parent.name]


def test_failed_frames_show_with_reasons_and_retry_reruns_only_those(farm_env, nuke, ui):
    farm = farm_env
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    plate = make_plate(farm.storage / "plates", range(1001, 1007))
    for bad in (1002, 1005):
        Path(frame_path(plate, bad)).write_bytes(b"not an exr")
    source = nuke.nodes.Read(file=plate, first=1001, last=1006)
    sub = ui.submit(source, "passthrough", farm=f)
    read = sub.read
    pump(nuke, lambda: "[failed]" in read["label"].value())
    lines = read["label"].value().splitlines()
    assert lines[2:] == ["4/6 done, 2 failed [failed]", "failed: 1002,1005"]
    failures = read["mlfarm_failures"].value().splitlines()
    assert [line.split(":")[0] for line in failures] == ["1002", "1005"]
    assert frame_path(plate, 1002) in failures[0]
    kept = {fr: os.stat(frame_path(sub.spec.output, fr)).st_mtime_ns for fr in (1001, 1003, 1004, 1006)}

    for bad in (1002, 1005):  # the artist fixes the plate, then presses Retry failed on the node
        write_exr(Path(frame_path(plate, bad)), sample_pixels(bad))
    read["mlfarm_retry"].execute()
    pump(nuke, lambda: "[done]" in read["label"].value())
    assert read["label"].value().splitlines()[2] == "6/6 done [done]"
    assert read["mlfarm_failures"].value() == "no failed frames"
    status = f.status(sub.job_id)
    assert {fs.frame: fs.attempts for fs in status.frames} == {1001: 1, 1002: 2, 1003: 1, 1004: 1, 1005: 2, 1006: 1}
    assert {fr: os.stat(frame_path(sub.spec.output, fr)).st_mtime_ns for fr in kept} == kept
    np.testing.assert_allclose(read.pixels(1005), sample_pixels(1005), **HALF)

    read["mlfarm_retry"].execute()  # nothing left to retry: said so, nothing queued
    assert nuke.messages[-1] == f"ML Farm: job {sub.job_id} has no failed frames"

    # Cancel job on the node: queued frames are dropped, the label ends cancelled, no message.
    long = ui.submit(source, "slow", {"seconds": 0.5}, chunk=1, farm=f)
    pump(nuke, lambda: "[running]" in long.read["label"].value())
    long.read["mlfarm_cancel"].execute()
    pump(nuke, lambda: "[cancelled]" in long.read["label"].value())
    final = f.status(long.job_id)
    # The worker takes three one-frame chunks at once (MLFARM_WORKER_THREADS): those finish, the rest is dropped.
    assert final.counts["cancelled"] >= 2 and final.counts["done"] + final.counts["cancelled"] == 6
    assert nuke.messages[-1] == f"ML Farm: job {sub.job_id} has no failed frames"  # nothing new to report


def test_menu_commands_refuse_bad_input_with_a_message_and_queue_nothing(farm_env, nuke, ui):
    farm = farm_env
    farm.start_worker()
    from mlfarm.nuke_submit import menu

    install = Path(ui.__file__).parent / "nuke_path"
    exec(compile((install / "menu.py").read_text(), str(install / "menu.py"), "exec"), {})
    bar = nuke.menu("Nuke")
    assert [i.name() for i in bar.findItem(menu.MENU).items()] == [
        "Submit selected...", "Segment objects (SAM 2)...", "Refresh results", "Retry failed (selected results)",
        "Settings..."]

    bar.findItem("ML Farm/Submit selected...").invoke()
    assert nuke.messages[-1] == "ML Farm: select the node to submit first"

    stereo = nuke.nodes.Read(file=str(farm.storage / "st" / "plate.%V.%04d.exr"), first=1, last=3)
    stereo.setSelected(True)
    assert ui.submit_selected() is None
    assert "stereo view patterns (%V/%v) are not supported" in nuke.messages[-1]

    stereo.setSelected(False)
    plate = make_plate(farm.storage / "plates", [1001, 1002, 1005])
    gappy = nuke.nodes.Read(file=plate, first=1001, last=1005)
    gappy.setSelected(True)
    nuke.modal_answer = True
    assert ui.submit_selected() is None
    assert nuke.messages[-1].startswith("ML Farm: 2 of 5 input frames are missing: 1003,1004")
    assert farm.farm().jobs() == []

    bar.findItem("ML Farm/Settings...").invoke()
    text = nuke.messages[-1]
    password = farm.url.split("@")[0].rsplit(":", 1)[1]
    assert password not in text and ":***@" in text
    assert f"storage root: {farm.storage}" in text

    # Reopening a script: the hook the menu installed follows its results Reads again, by itself.
    gappy.setSelected(False)
    src = nuke.nodes.Read(file=make_plate(farm.storage / "full", [1, 2, 3]), first=1, last=3)
    sub = ui.submit(src, "slow", {"seconds": 1.0}, chunk=1, farm=farm.farm(), watch=False)
    name = sub.read.name()
    nuke.scriptSaveAs(str(farm.root / "reopened.nk"))
    nuke.scriptOpen(str(farm.root / "reopened.nk"))
    assert ui.WATCHERS.running(sub.job_id)
    read = nuke.toNode(name)
    pump(nuke, lambda: "[done]" in read["label"].value())
    assert "models: " + ", ".join(sorted(farm.farm().catalog(include_local=False))) in text


def test_refresh_results_reattaches_after_reopening_and_says_when_the_farm_is_unreachable(farm, nuke, ui, tmp_path):
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    plate = make_plate(farm.storage / "plates", range(1, 5))
    source = nuke.nodes.Read(file=plate, first=1, last=4)
    sub = ui.submit(source, "slow", {"seconds": 0.4}, chunk=1, farm=f, watch=False)
    script = tmp_path / "shot script ä.nk"
    name = sub.read.name()
    nuke.scriptSaveAs(str(script))
    nuke.scriptOpen(str(script))  # as after a restart: no watcher, the node from the file
    with pytest.raises(ValueError):
        sub.read.name()  # the old node object is gone, as in Nuke
    read = nuke.toNode(name)
    assert read is not None and read["mlfarm_job"].value() == sub.job_id

    ui.refresh_results(f)
    assert ui.WATCHERS.running(sub.job_id) or "[done]" in read["label"].value()
    pump(nuke, lambda: "[done]" in read["label"].value())
    assert read["label"].value().splitlines()[2] == "4/4 done [done]"

    # A results Read deleted while its job runs: its watcher stops instead of failing on every poll.
    doomed = ui.submit(nuke.toNode("Read1"), "slow", {"seconds": 0.5}, chunk=1, farm=f)
    nuke.delete(doomed.read)
    pump(nuke, lambda: not ui.WATCHERS.running(doomed.job_id), timeout=30)
    assert not f.status(doomed.job_id).finished

    from mlfarm.client import Farm

    down = Farm(farm.settings(nuke_poll_interval=0.1), url="redis://127.0.0.1:9/0")
    ui.follow(read, down)
    pump(nuke, lambda: "farm unreachable" in read["label"].value(), timeout=60)


def test_headless_entry_point_opens_submits_waits_and_saves(farm, nuke, tmp_path, capsys):
    farm.start_worker()
    from mlfarm.nuke_submit import headless, nuke_ui

    f = farm.farm(nuke_poll_interval=0.1)
    plate = make_plate(farm.storage / "plates", range(1001, 1004))
    nuke.nodes.Read(file=plate, first=1001, last=1003)
    script = tmp_path / "sh 020_comp_v001.nk"
    nuke.scriptSaveAs(str(script))
    nuke.reset()

    code = headless.main([str(script), "--node", "Read1", "--model", "blur", "--option", "kernel_size=2",
                          "--frames", "1001-1003", "--wait", "--save", "--json"], farm=f)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["state"] == "done" and out["failed"] == [] and not out["rendered_first"]
    expected_out = farm.storage / "sh 020_comp" / "ml" / "blur" / "v001" / "sh 020_comp_blur_v001.####.exr"
    assert out["output"] == str(expected_out)
    assert f.status(out["id"]).spec.options == {"kernel_size": 2}

    nuke.scriptOpen(str(script))  # the saved script holds the results Read, finished
    read = nuke.toNode(out["read"])
    assert read["mlfarm_job"].value() == out["id"] and "3/3 done [done]" in read["label"].value()
    assert not nuke_ui.WATCHERS.running(out["id"])  # headless polls in its own thread, starts no watcher

    code = headless.main(["--node", "Read1", "--model", "nope", "--frames", "1001"], farm=f)
    assert code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    code = headless.main(["--node", "Nope1", "--model", "blur"], farm=f)
    assert code == 2 and "no node named Nope1" in capsys.readouterr().err

    # As `nuke -t headless.py ...` runs it: the file as a script in its own process, connecting by settings.
    Path(frame_path(plate, 1002)).write_bytes(b"not an exr")
    env = dict(farm.env, PYTHONPATH=str(STUB), MLFARM_NUKE_POLL_INTERVAL="0.1")
    proc = subprocess.run([sys.executable, headless.__file__, str(script), "--node", "Read1", "--model", "passthrough",
                           "--frames", "1001-1002", "--wait", "--json"], env=env, capture_output=True, text=True,
                          timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1, proc.stderr  # a frame failed
    assert out["state"] == "failed" and [x["frame"] for x in out["failed"]] == [1002]
    assert frame_path(plate, 1002) in out["failed"][0]["reason"]  # the reason names the bad file


def test_the_nuke_path_init_puts_the_client_folder_on_the_path(nuke, tmp_path, monkeypatch):
    site = tmp_path / "mlfarm site"
    site.mkdir()
    monkeypatch.setenv("MLFARM_NUKE_SITE", str(site))
    monkeypatch.setattr(sys, "path", list(sys.path))
    init = Path(__file__).resolve().parent.parent / "nuke_submit" / "nuke_path" / "init.py"
    exec(compile(init.read_text(), str(init), "exec"), {"__file__": str(init)})
    assert sys.path[0] == str(site)

    # Installed with `pip install --target SITE`, NUKE_PATH=SITE/mlfarm/nuke_submit/nuke_path needs nothing else.
    monkeypatch.delenv("MLFARM_NUKE_SITE")
    installed = tmp_path / "sité" / "mlfarm" / "nuke_submit"
    (installed / "nuke_path").mkdir(parents=True)
    (installed / "nuke_ui.py").write_text("")
    copy = installed / "nuke_path" / "init.py"
    copy.write_text(init.read_text())
    exec(compile(copy.read_text(), str(copy), "exec"), {"__file__": str(copy)})
    assert sys.path[0] == str(tmp_path / "sité")


def test_a_retimed_read_submits_its_files_frames_and_the_results_line_up_with_it(farm, nuke, ui):
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    plate = make_plate(farm.storage / "retimed", range(1001, 1011))
    # Files 1001-1006 shown from frame 1 ("start at" 1), as an artist lines a plate up with a comp at 1.
    start_at = nuke.nodes.Read(file=plate, first=1001, last=1006, origfirst=1001, origlast=1010,
                               frame_mode="start at", frame="1")
    assert (start_at.firstFrame(), start_at.lastFrame()) == (1, 6)
    whole = ui.submit(start_at, "passthrough", farm=f)
    assert not whole.rendered_first and whole.spec.frames == list(range(1001, 1007))  # the files' numbers
    assert (whole.read.firstFrame(), whole.read.lastFrame()) == (1, 6)  # the same timing as the plate
    assert (whole.read["frame_mode"].value(), whole.read["frame"].value()) == ("offset", "-1000")

    # An offset into a longer sequence, part of it submitted: only the files shown at those frames.
    offset = nuke.nodes.Read(file=plate, first=1003, last=1008, frame_mode="offset", frame="-1000")
    part = ui.submit(offset, "passthrough", frames="4-5", farm=f)
    assert part.spec.frames == [1004, 1005]
    assert (part.read.firstFrame(), part.read.lastFrame()) == (4, 5)

    # A frame expression only Nuke evaluates (the plate backwards): Nuke renders the timeline's frames first.
    backwards = nuke.nodes.Read(file=plate, first=1001, last=1004, frame="2005-frame")
    reverse = ui.submit(backwards, "passthrough", farm=f)
    assert reverse.rendered_first and reverse.spec.frames == [1001, 1002, 1003, 1004]

    pump(nuke, lambda: all("[done]" in s.read["label"].value() for s in (whole, part, reverse)))
    for t in (1, 4, 6):  # each result sits at the timeline frame of the plate frame it came from
        np.testing.assert_allclose(whole.read.pixels(t), start_at.pixels(t), **HALF)
        np.testing.assert_allclose(whole.read.pixels(t), sample_pixels(1000 + t), **HALF)
    for t in (4, 5):
        np.testing.assert_allclose(part.read.pixels(t), sample_pixels(1000 + t), **HALF)
    np.testing.assert_allclose(reverse.read.pixels(1001), sample_pixels(1004), **HALF)
    np.testing.assert_allclose(reverse.read.pixels(1004), backwards.pixels(1004), **HALF)

    black = nuke.nodes.Read(file=plate, first=1001, last=1002, before="black", after="black")
    with pytest.raises(PlanError, match=r"Read\d+ shows none of its files at frames 5,6 \(black outside 1001-1002\)"):
        ui.submit(black, "passthrough", frames="5-6", farm=f, watch=False)


def test_ok_and_cancel_stay_last_when_the_model_changes_in_the_open_dialog(farm, nuke, ui):
    farm.start_worker()
    f = farm.farm()
    source = nuke.nodes.Read(file=make_plate(farm.storage / "plates", [1, 2]), first=1, last=2)
    panel = ui.SubmitPanel(source, f)
    orders = []

    def artist(open_panel):  # switches models while the dialog is up, then presses Cancel
        for model in ("slow", "passthrough", "slow"):
            nuke.user_sets(open_panel, "model", model)
            orders.append(list(open_panel.knobs()))
        open_panel.knobChangedCallback(open_panel.cancelButton)
        return True

    nuke.modal_answer = artist
    assert panel.showModalDialog() is False  # Cancel was pressed
    assert [o[-2:] for o in orders] == [["OK", "Cancel"]] * 3
    assert "opt_seconds" in orders[0] and "opt_seconds" not in orders[1] and "opt_seconds" in orders[2]
    assert panel.okButton.label() == "Submit"


@pytest.fixture
def hung_farm(monkeypatch, tmp_path):
    """Settings pointing at a 'Redis' that accepts connections and never answers (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)  # the kernel completes every handshake; nothing ever reads or replies
    for key in [k for k in os.environ if k.startswith("MLFARM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFARM_BROKER_URL", f"redis://127.0.0.1:{server.getsockname()[1]}/0")
    monkeypatch.setenv("MLFARM_NUKE_TIMEOUT", "1")
    monkeypatch.setenv("MLFARM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFARM_STORAGE_ROOT", str(tmp_path / "storage"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()
    server.close()


def timed(call, *args) -> float:
    started = time.monotonic()
    call(*args)
    return time.monotonic() - started


def test_a_farm_that_does_not_answer_never_freezes_nuke_longer_than_the_timeout(hung_farm, nuke, ui):
    from mlfarm.nuke_submit import menu

    menu.install()
    plate = make_plate(hung_farm / "storage" / "plates", [1, 2, 3])
    source = nuke.nodes.Read(file=plate, first=1, last=3)
    source.setSelected(True)
    assert timed(ui.submit_selected) < 2.5
    assert nuke.messages[-1].startswith("ML Farm: cannot reach the farm (no answer within 1s): ")

    # A script with a results Read, opened while the farm hangs: opening it waits on nothing.
    spec = SimpleNamespace(id="0123abcd", model="blur", model_version="1", frames=[1, 2, 3],
                           output=str(hung_farm / "storage" / "out" / "o.####.exr"))
    name = ui.create_results_read(source, spec, {"outputs": {"rgba": 4}}, False).name()
    nuke.scriptSaveAs(str(hung_farm / "shot.nk"))
    assert timed(nuke.scriptOpen, str(hung_farm / "shot.nk")) < 0.5
    read = nuke.toNode(name)
    pump(nuke, lambda: "farm unreachable" in read["label"].value(), timeout=30)

    for button in ("mlfarm_refresh", "mlfarm_retry", "mlfarm_cancel", "mlfarm_pause", "mlfarm_resume"):
        before = len(nuke.messages)
        assert timed(read[button].execute) < 2.5, button
        assert len(nuke.messages) == before + 1
        assert nuke.messages[-1].startswith("ML Farm: cannot reach the farm (no answer within 1s): "), button
    assert timed(ui.refresh_results_command) < 0.5  # follows again off the main thread
    assert timed(ui.show_settings) < 2.5 and "cannot reach the farm" in nuke.messages[-1]


def test_a_results_read_whose_job_record_expired_says_what_happened_and_what_to_do(farm_env, nuke, ui):
    farm = farm_env
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    source = nuke.nodes.Read(file=make_plate(farm.storage / "plates", [1, 2, 3]), first=1, last=3)
    sub = ui.submit(source, "passthrough", farm=f)
    read = sub.read
    pump(nuke, lambda: "[done]" in read["label"].value())
    assert f.redis.delete(job_key(sub.job_id), frames_key(sub.job_id)) == 2  # as MLFARM_JOB_TTL does
    days = f.settings.job_ttl / 86400
    folder = os.path.dirname(read["file"].value())
    expected = (f"ML Farm: job {sub.job_id} is no longer on the farm: job records are kept {days:g} days after "
                f"their last change. The frames it rendered are still on disk ({folder}); "
                "to render again, submit the source node again.")
    expired_label = (f"mlfarm {sub.job_id}\njob record expired on the farm\n"
                     "frames on disk are kept; resubmit to render again")
    for button in ("mlfarm_refresh", "mlfarm_retry", "mlfarm_cancel", "mlfarm_pause", "mlfarm_resume"):
        read["label"].setValue("")
        read[button].execute()
        assert nuke.messages[-1] == expected, button
        assert read["label"].value() == expired_label
    assert os.path.isfile(frame_path(sub.spec.output, 2))  # nothing on disk was touched

    read["label"].setValue("")
    ui.refresh_results()  # as after reopening the script: the watcher says so too, then stops
    pump(nuke, lambda: read["label"].value() == expired_label)
    pump(nuke, lambda: not ui.WATCHERS.running(sub.job_id), timeout=10)


def test_a_prompt_node_marks_objects_in_nukes_coordinates_and_submits_them_as_the_files_frames(farm_env, nuke, ui):
    from mlfarm.nuke_submit import prompt_node

    farm = farm_env
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    plate = make_plate(farm.storage / "plates", range(1001, 1005))  # 64x48
    # The plate lined up with the comp at frame 1: the artist works on timeline frames 1-4.
    source = nuke.nodes.Read(file=plate, first=1001, last=1004, frame_mode="start at", frame="1")
    source.setSelected(True)
    node = prompt_node.segment_selected()
    assert node.input(0) is source and node.panel_shown and node.Class() == "NoOp"
    node["obj1_name"].setValue("car")
    node["obj1_box"].setValue([8, 30, 22, 42])  # Nuke's coordinates: origin bottom-left, y up
    node["obj1_use_pos1"].setValue(True)
    node["obj1_pos1"].setValue([15, 36])
    node["obj2_use_neg1"].setValue(True)  # slot 2: a negative point alone is still a prompt
    node["obj2_neg1"].setValue([60.5, 2])
    nuke.frame(2)
    node["mlfarm_set_key"].execute()
    assert node["mlfarm_keyframes_text"].value() == "2: car, object 2"

    def artist(panel):  # the panel comes up with SAM 2 chosen; this farm's test model stands in for it
        assert panel.model.value() == "sam2" and panel.knobs()["prompts"].value() == "2: car, object 2"
        nuke.user_sets(panel, "model", "counter")
        assert panel.chunk.value() == f.settings.sequence_segment  # a sequence model's segment, not a chunk
        return True

    nuke.modal_answer = artist
    node["mlfarm_submit_prompts"].execute()
    assert not nuke.messages, nuke.messages
    (job,) = f.jobs()
    assert job.spec.model == "counter" and job.spec.frames == [1001, 1002, 1003, 1004]
    assert job.spec.prompts == [  # top-left origin, rows down, on the file's frame
        {"frame": 1002, "object": 1, "name": "car", "box": [8.0, 6.0, 22.0, 18.0], "points": [[15.0, 12.0, 1]]},
        {"frame": 1002, "object": 2, "points": [[60.5, 46.0, 0]]}]
    read = [n for n in nuke.allNodes("Read") if n.knob("mlfarm_job") is not None][0]
    pump(nuke, lambda: "[done]" in read["label"].value())
    assert (read.firstFrame(), read.lastFrame()) == (1, 4)

    node["mlfarm_clear_keys"].execute()
    assert node["mlfarm_keyframes"].value() == "" and "no keyframes yet" in node["mlfarm_keyframes_text"].value()


def test_a_results_read_offers_to_wait_for_its_job_and_its_tab_pauses_and_resumes_it(farm_env, nuke, ui):
    farm = farm_env
    farm.start_worker()
    f = farm.farm(nuke_poll_interval=0.1)
    frames = list(range(1, 9))
    source = nuke.nodes.Read(file=make_plate(farm.storage / "plates", frames), first=1, last=8)
    first = ui.submit(source, "tally", {"seconds": 0.3}, chunk=2, farm=f)

    # The first job's results Read as the input: the panel offers to wait for that job, by default
    # for all of it while it still renders; frame by frame queues each frame as soon as it lands.
    panel = ui.SubmitPanel(first.read, f)
    assert panel.wait_for is not None and panel.wait_for.value() == "whole job"
    assert panel.wait_for.values() == ["whole job", "frame by frame", "no"]
    assert ui.SubmitPanel(source, f).wait_for is None  # a plate has no job to wait for
    nuke.user_sets(panel, "model", "passthrough")
    nuke.user_sets(panel, "wait_for", "frame by frame")
    nuke.user_sets(panel, "chunk", 2)
    second = panel.submit()
    assert second.spec.after_frames == first.job_id and second.spec.after == []

    # Pause on the first job's ML Farm tab: its queued frames are held, the label says so.
    pump(nuke, lambda: done_count(first.read["label"].value()) >= 2)
    first.read["mlfarm_pause"].execute()
    pump(nuke, lambda: "[paused]" in first.read["label"].value())
    assert " held [paused]" in first.read["label"].value()
    held = f.status(first.job_id).counts["held"]
    assert held > 0
    time.sleep(1.0)
    assert f.status(first.job_id).counts["held"] == held  # nothing of it ran while paused
    label = second.read["label"].value()
    assert "waiting" in label and f"waiting on job {first.job_id} frames" in label, label

    first.read["mlfarm_resume"].execute()
    pump(nuke, lambda: "[done]" in first.read["label"].value())
    pump(nuke, lambda: "[done]" in second.read["label"].value())
    parent, child = f.store.frame_records(first.job_id), f.store.frame_records(second.job_id)
    assert all(child[fr]["t0"] >= parent[fr]["t1"] for fr in frames)
    np.testing.assert_allclose(second.read.pixels(5), first.read.pixels(5), **HALF)
    assert nuke.messages == []
