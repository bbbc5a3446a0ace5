"""The pure parts of submitting from Nuke: frames, patterns, paths, names, Read settings, labels, knobs.

None of this needs Nuke or a farm; the Nuke layer only copies these decisions onto nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlfarm.models.catalog import Catalog, discover
from mlfarm.nuke_submit.knobs import PREFIX, option_knobs, options_from_knobs
from mlfarm.nuke_submit.plan import (
    PlanError,
    ReadTiming,
    check_frames_exist,
    choose_frames,
    farm_pattern,
    frame_runs,
    masked_url,
    missing_frames,
    output_pattern,
    place_beside,
    reads_directly,
    render_pattern,
    reserve_output,
    shot_name,
    write_channels,
)
from mlfarm.nuke_submit.results import (
    MAX_LISTED_FAILURES,
    Progress,
    expired_progress,
    failure_text,
    progress_label,
    read_settings,
)
from mlfarm.nuke_submit.watch import MAX_WAIT, POLL_CPU_BUDGET, next_wait
from mlfarm.settings import Settings

from conftest import PLUGINS

TEMPLATE = Settings.model_fields["nuke_output_template"].default
RENDER_TEMPLATE = Settings.model_fields["nuke_render_template"].default
BLUR = {"name": "blur", "outputs": {"rgba": 4}, "inputs": {"image": 4}}
MATTE = {"name": "matte", "outputs": {"matte": ["m"]}, "inputs": {"image": 3}}


# --- frames ------------------------------------------------------------------------------------
def test_frame_range_choices():
    assert choose_frames("input", (1001, 1004), (1, 100)) == [1001, 1002, 1003, 1004]
    assert choose_frames("script", (1001, 1004), (1, 3)) == [1, 2, 3]
    frames = choose_frames("custom", (0, 0), (0, 0), "1001-1100x2")
    assert frames[:3] == [1001, 1003, 1005] and frames[-1] == 1099 and len(frames) == 50
    assert choose_frames("custom", (0, 0), (0, 0), "1010, 1001-1003") == [1010, 1001, 1002, 1003]


@pytest.mark.parametrize("text, why", [("1001-", "bad frame range"), ("1100-1001", "comes after"),
                                       ("1001-1010x0", "at least 1"), ("", "empty")])
def test_bad_custom_ranges_are_refused_with_the_reason(text, why):
    with pytest.raises(PlanError, match=why):
        choose_frames("custom", (1, 1), (1, 1), text)


def test_other_frame_choices_are_refused():
    with pytest.raises(PlanError, match="ends before it starts"):
        choose_frames("input", (10, 5), (1, 1))
    with pytest.raises(PlanError, match="unknown frame range choice"):
        choose_frames("shot", (1, 1), (1, 1))


def test_frame_runs_cover_the_frames_in_order_for_execute():
    frames = [1, 2, 3, 5, 7, 9, 20]
    runs = frame_runs(frames)
    assert runs == [(1, 3, 1), (5, 9, 2), (20, 20, 1)]
    assert [f for a, b, s in runs for f in range(a, b + 1, s)] == frames


# --- input patterns --------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, expected", [
    ("/plates/sh010/plate.####.exr 1001-1100", "/plates/sh010/plate.####.exr"),
    ("/plates/sh010/plate.%04d.exr", "/plates/sh010/plate.%04d.exr"),
    ("/mnt/ström plates/sh 010/plate.%04d.exr 1-10", "/mnt/ström plates/sh 010/plate.%04d.exr"),
    ("/mnt/ström plates/sh 010/plate.#####.exr", "/mnt/ström plates/sh 010/plate.#####.exr"),
])
def test_nuke_file_knob_values_become_farm_patterns(knob, expected):
    assert farm_pattern(knob) == expected


@pytest.mark.parametrize("knob, why", [
    ("/plates/sh010/plate.%V.####.exr", "stereo view patterns"),
    ("/plates/sh010/plate_%v.%04d.exr", "stereo view patterns"),
    ("/plates/sh010/plate.exr", "no frame number token"),
    ("plates/plate.####.exr", "relative path"),
    ("", "no file path"),
])
def test_unusable_patterns_are_refused_clearly(knob, why):
    with pytest.raises(PlanError, match=why):
        farm_pattern(knob)


def test_missing_input_frames_are_listed_before_submit(tmp_path):
    folder = tmp_path / "plätes mit leerzeichen"
    folder.mkdir()
    for f in (1001, 1002, 1004, 1008):
        (folder / f"plate.{f:04d}.exr").write_bytes(b"x")
    pattern = str(folder / "plate.%04d.exr")
    assert missing_frames(pattern, range(1001, 1009)) == [1003, 1005, 1006, 1007]
    with pytest.raises(PlanError) as info:
        check_frames_exist(pattern, list(range(1001, 1009)))
    assert "4 of 8 input frames are missing: 1003,1005-1007" in str(info.value)
    assert "plätes mit leerzeichen" in str(info.value)
    check_frames_exist(pattern, [1001, 1002, 1004])  # all there: no error


def test_only_exr_reads_on_shared_storage_are_read_directly(tmp_path):
    root, shared, elsewhere = tmp_path / "storage", tmp_path / "plates", tmp_path / "storage2"
    for d in (root, shared, elsewhere):
        d.mkdir()
    roots = [str(root), str(shared)]
    assert reads_directly("Read", str(root / "sh 010" / "p.####.exr"), roots)
    assert reads_directly("Read", str(shared / "p.%04d.EXR"), roots)
    assert not reads_directly("Read", str(root / "p.####.jpg"), roots)  # Nuke converts it first
    assert not reads_directly("Grade", str(root / "p.####.exr"), roots)
    assert not reads_directly("Read", str(elsewhere / "p.####.exr"), roots)  # a prefix is not a parent
    (root / "link").symlink_to(tmp_path / "storage2")
    assert not reads_directly("Read", str(root / "link" / "p.####.exr"), roots)  # resolved, it leads out


# --- names and output folders --------------------------------------------------------------------------
def test_shot_names():
    assert shot_name("/jobs/show/sh010_comp_v003.nk") == "sh010_comp"
    assert shot_name("/jobs/show/Szene ä 12.v7.nk") == "Szene ä 12"
    assert shot_name("Root", "/plates/sh020/plate.####.exr") == "sh020"
    assert shot_name("", "") == "untitled"


def test_output_versions_never_mix_with_earlier_frames(tmp_path):
    root = tmp_path / "störage root"
    first = output_pattern(TEMPLATE, str(root), "sh 010", "blur")
    assert first == str(root / "sh 010" / "ml" / "blur" / "v001" / "sh 010_blur_v001.####.exr")
    assert output_pattern(TEMPLATE, str(root), "sh 010", "blur") == first  # nothing written yet
    os.makedirs(os.path.dirname(first))
    assert output_pattern(TEMPLATE, str(root), "sh 010", "blur") == first  # an empty folder is free
    Path(os.path.dirname(first), ".sh 010_blur_v001.1001.exr.partial-h-1-ab").write_bytes(b"")
    second = output_pattern(TEMPLATE, str(root), "sh 010", "blur")
    assert second.endswith(os.path.join("v002", "sh 010_blur_v002.####.exr"))
    assert output_pattern(TEMPLATE, str(root), "sh 010", "blur", version=7).endswith("v007.####.exr")
    marker = reserve_output(second, "job42")  # submitted, no frame landed yet: the version is taken all the same
    assert os.path.basename(marker) == ".sh 010_blur_v002.mlfarm-job-job42"
    assert output_pattern(TEMPLATE, str(root), "sh 010", "blur").endswith("v003.####.exr")
    assert os.sep + "a_b" + os.sep in output_pattern(TEMPLATE, str(root), "a/b", "blur")  # no sneaking out


@pytest.mark.parametrize("template, why", [("{shot}/{model}.exr", "no frame number token"),
                                           ("{shot}/{take}.####.exr", "take")])
def test_bad_output_templates_are_refused(tmp_path, template, why):
    with pytest.raises(PlanError, match=why):
        output_pattern(template, str(tmp_path), "sh010", "blur")


def test_render_first_gets_a_new_folder_each_time(tmp_path):
    a = render_pattern(RENDER_TEMPLATE, str(tmp_path), "sh010", "Grade1")
    b = render_pattern(RENDER_TEMPLATE, str(tmp_path), "sh010", "Grade1")
    assert a != b and os.path.dirname(a) != os.path.dirname(b)
    assert a.startswith(str(tmp_path / "sh010" / "ml" / "_renders" / "Grade1_")) and a.endswith("Grade1.####.exr")


def test_small_helpers():
    assert masked_url("redis://:s3cret@farm:6379/0") == "redis://:***@farm:6379/0"
    assert masked_url("redis://user:pw@farm/0") == "redis://user:***@farm/0"
    assert masked_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert write_channels(BLUR) == "rgba" and write_channels(MATTE) == "rgb"


# --- the results Read -------------------------------------------------------------------------------
def test_results_read_settings_after_render_first_are_raw():
    rs = read_settings("abc123", "blur", "2", "/st/sh010/ml/blur/v003/sh010_blur_v003.####.exr",
                       [1001, 1003, 1010], BLUR, rendered_first=True, source_raw=False, source_colorspace="sRGB")
    assert rs.file == "/st/sh010/ml/blur/v003/sh010_blur_v003.%04d.exr"
    assert (rs.first, rs.last) == (1001, 1010)
    assert rs.raw is True and rs.colorspace is None
    assert rs.name == "ML_blur_v003"
    assert rs.label.splitlines() == ["mlfarm abc123", "blur v2", "0/3 done [queued]"]
    assert rs.knobs == {"mlfarm_job": "abc123", "mlfarm_frames": "1001,1003,1010"}


def test_results_read_colour_follows_the_plate_for_images_and_stays_raw_for_data():
    colour = read_settings("j", "blur", "2", "/o/x.####.exr", [1], BLUR, False, False, "ACES - ACEScg")
    assert (colour.raw, colour.colorspace) == (False, "ACES - ACEScg")
    raw_plate = read_settings("j", "blur", "2", "/o/x.####.exr", [1], BLUR, False, True, "ACES - ACEScg")
    assert (raw_plate.raw, raw_plate.colorspace) == (True, None)
    default = read_settings("j", "blur", "2", "/o/x.####.exr", [1], BLUR, False, False, "default (linear)")
    assert (default.raw, default.colorspace) == (False, None)  # left at the new Read's own default
    data = read_settings("j", "matte", "1", "/o/x.####.exr", [1], MATTE, False, False, "sRGB")
    assert (data.raw, data.colorspace) == (True, None)


def test_progress_label_and_failure_text():
    p = Progress(job_id="j1", model="blur", state="running", total=10, done=6, failed=2, running=1, queued=1,
                 failures=((1003, "frame 1003: /p/plate.1003.exr: file not found"), (1005, "boom")))
    label = progress_label(p, "2")
    assert label.splitlines() == ["mlfarm j1", "blur v2", "6/10 done, 2 failed [running]", "failed: 1003,1005"]
    assert failure_text(p.failures).splitlines() == ["1003: frame 1003: /p/plate.1003.exr: file not found",
                                                     "1005: boom"]
    many = tuple((f, "r") for f in range(MAX_LISTED_FAILURES + 5))
    assert failure_text(many).splitlines()[-1] == "... and 5 more"
    assert failure_text(()) == "no failed frames"
    assert "farm unreachable: x" in progress_label(Progress("j", "m", "unknown", 0, error="farm unreachable: x"))
    stalled = Progress(job_id="j2", model="blur", state="running", total=4, done=1, running=2, queued=1, stalled=2)
    assert progress_label(stalled).splitlines()[-1] == "2 on a worker not responding: queued again soon"


# --- knobs from the catalog ----------------------------------------------------------------------------
def test_option_knobs_follow_the_published_description():
    desc = Catalog(discover([PLUGINS])).entry("slow").describe()
    specs = option_knobs(desc)
    kinds = {s.option: (s.kind, s.default) for s in specs}
    assert kinds == {"seconds": ("float", 0.5), "gain": ("float", 1.0), "mode": ("enum", "copy"),
                     "label": ("string", "x"), "flag": ("bool", False)}
    by_option = {s.option: s for s in specs}
    assert by_option["mode"].values == ("copy", "invert")
    assert by_option["seconds"].range == (0.0, 30.0)
    assert by_option["flag"].button and all(s.name == PREFIX + s.option for s in specs)
    values = {"opt_seconds": 2, "opt_mode": "invert", "opt_flag": 1.0, "opt_label": "é x"}
    assert options_from_knobs(specs, values) == {"seconds": 2, "mode": "invert", "flag": True, "label": "é x"}


def test_int_knobs_hand_back_ints_and_unknown_types_are_refused():
    desc = {"name": "m", "options": [{"name": "n", "type": "int", "default": 3, "min": 0, "max": 9}], "buttons": []}
    specs = option_knobs(desc)
    assert specs[0].kind == "int" and specs[0].range == (0, 9)
    got = options_from_knobs(specs, {"opt_n": 4.0})
    assert got == {"n": 4} and type(got["n"]) is int
    with pytest.raises(ValueError, match="unknown type"):
        option_knobs({"name": "m", "options": [{"name": "x", "type": "tensor", "default": 0}]})


def test_polls_are_spaced_so_following_jobs_stays_within_budget():
    assert next_wait(2.0, 0.0004, 20) == 2.0  # a 100-frame job: the configured interval
    assert next_wait(2.0, 0.05, 20) == pytest.approx(0.05 * 20 / POLL_CPU_BUDGET)  # 20 jobs of 10,000 frames
    assert next_wait(0.1, 0.01, 0) == pytest.approx(0.01 / POLL_CPU_BUDGET)  # no peers counted: itself
    assert next_wait(2.0, 10.0, 50) == MAX_WAIT  # labels never go stale for longer than this
    assert next_wait(45.0, 10.0, 50) == 45.0  # a configured interval above the cap is kept


# --- a Read's timing -------------------------------------------------------------------------------
def test_a_read_starting_at_another_frame_maps_timeline_frames_to_its_files():
    # Files 1001-1006 shown from frame 1 ("start at" 1): the timeline's 1-6 are the files' 1001-1006.
    t = ReadTiming(first=1001, last=1006, frame_mode="start at", frame="1")
    assert t.shift() == -1000
    assert [t.file_frame(f) for f in range(1, 7)] == list(range(1001, 1007))
    assert t.file_frames(range(1, 7)) == list(range(1001, 1007))
    assert t.file_frames([2, 4]) == [1002, 1004]
    assert t.file_frame(0) == 1001 and t.file_frame(9) == 1006  # hold, Nuke's default, before and after
    results = t.for_results([1002, 1004])
    assert (results.first, results.last, results.frame_mode, results.frame) == (1002, 1004, "offset", "-1000")
    assert results.file_frame(2) == 1002 and results.file_frame(4) == 1004  # lines up with the plate


def test_offsets_and_plain_frame_expressions_are_understood_others_are_not():
    assert ReadTiming(1003, 1006, "offset", "-1000").file_frames(range(3, 7)) == [1003, 1004, 1005, 1006]
    assert ReadTiming(1, 10, "offset", "").shift() == 0
    assert ReadTiming(1, 10).shift() == 0 and ReadTiming(1, 10, "expression", "frame").shift() == 0
    assert ReadTiming(1, 10, "expression", "frame + 10").file_frame(1) == 10  # held at last
    assert ReadTiming(1, 20, "expression", "frame+10").file_frame(3) == 13
    assert ReadTiming(1, 20, "expression", "frame-2").file_frame(5) == 3
    for mode, frame in (("expression", "7-frame"), ("expression", "frame*2"), ("offset", "abc"), ("nope", "")):
        t = ReadTiming(1, 6, mode, frame)
        assert t.shift() is None and t.file_frame(3) is None and t.file_frames([1, 2]) == []
    identity = ReadTiming(1001, 1006).for_results([1001, 1006])
    assert (identity.frame_mode, identity.frame) == ("expression", "")


def test_frames_outside_a_read_follow_its_before_and_after_rules():
    loop = ReadTiming(1, 4, before="loop", after="loop")
    assert [loop.file_frame(f) for f in range(-1, 10)] == [3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1]
    bounce = ReadTiming(1, 4, before="bounce", after="bounce")
    assert [bounce.file_frame(f) for f in range(1, 11)] == [1, 2, 3, 4, 3, 2, 1, 2, 3, 4]
    black = ReadTiming(1, 4, before="black", after="black")
    assert black.file_frame(0) is None and black.file_frame(5) is None
    assert black.file_frames(range(-2, 8)) == [1, 2, 3, 4]
    assert ReadTiming(1, 4).file_frames(range(-2, 8)) == [1, 2, 3, 4]  # held frames are rendered once


# --- placing the results Read ----------------------------------------------------------------------
def overlapping(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_new_reads_go_beside_the_source_and_never_onto_another_node():
    source = (100, 200, 80, 78)
    placed = []
    obstacle = (215, 210, 80, 18)  # a node just right of the source
    for _ in range(4):  # resubmitting from the same node four times
        x, y = place_beside(source, (80, 78), [source, obstacle] + placed)
        placed.append((x, y, 80, 78))
    assert all(y == 200 and x > 100 + 80 for x, y, _, _ in placed)  # level with the source, to its right
    everything = [source, obstacle] + placed
    for i, a in enumerate(everything):
        for b in everything[i + 1:]:
            assert not overlapping(a, b), (a, b)
    assert placed[0][0] > obstacle[0] + obstacle[2]  # stepped past the obstacle
    assert place_beside(source, (80, 78), [source]) == (100 + 80 + 30, 200)  # nothing in the way: right beside it


def test_an_expired_jobs_label_says_what_happened_and_what_to_do():
    p = expired_progress("abc123")
    assert p.finished
    assert progress_label(p) == ("mlfarm abc123\njob record expired on the farm\n"
                                 "frames on disk are kept; resubmit to render again")


def test_the_old_client_path_still_imports_for_nuke_scripts_in_the_wild_with_a_warning(monkeypatch):
    import importlib
    import sys

    from mlfarm.client import Farm, SubmitError

    monkeypatch.delitem(sys.modules, "mlfarm.nuke_submit.client", raising=False)
    with pytest.warns(DeprecationWarning, match="import Farm and SubmitError from mlfarm.client"):
        old = importlib.import_module("mlfarm.nuke_submit.client")
    assert old.Farm is Farm and old.SubmitError is SubmitError
