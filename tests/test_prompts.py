"""Prompts for promptable models: parsed from JSON and inline forms, refused with the reason, and
Nuke's Viewer coordinates (origin bottom-left) turned into file pixels (origin top-left)."""

from __future__ import annotations

import json

import pytest

from mlfarm.prompts import (
    KeyPrompt,
    Point,
    PromptError,
    check_prompts,
    from_json,
    from_nuke_box,
    from_nuke_point,
    load,
    parse_inline,
)


def test_json_prompts_give_objects_ids_names_and_keyframes():
    p = from_json([
        {"frame": 1001, "object": 1, "name": "car", "box": [120, 80, 640, 400]},
        {"frame": 1001, "name": "dog", "points": [[300, 200, 1], [320, 260, 0]]},
        {"frame": 1040, "object": 1, "points": [[500, 210, 1]]},
    ])
    assert p.object_ids == [1, 2] and p.names == {1: "car", 2: "dog"} and p.frames == [1001, 1040]
    assert p.at(1040) == [KeyPrompt(1040, 1, (Point(500.0, 210.0, True),), None)]
    dog = [k for k in p.at(1001) if k.object_id == 2][0]
    assert dog.points == (Point(300.0, 200.0, True), Point(320.0, 260.0, False)) and dog.box is None
    assert from_json(p.to_json()) == p  # the stored form reads back the same
    assert from_json({"prompts": p.to_json()}) == p


def test_inline_prompts_are_the_short_form_of_the_same_thing():
    p = parse_inline(["1001:car:box=120,80,640,400", "1001:car:pos=300,200;310,210:neg=50,50", "1010:dog:pos=5,6"])
    assert p.names == {1: "car", 2: "dog"}
    car = p.at(1001)[0]
    assert car.box == (120.0, 80.0, 640.0, 400.0)
    assert car.points == (Point(300.0, 200.0), Point(310.0, 210.0), Point(50.0, 50.0, False))
    assert p.at(1010) == [KeyPrompt(1010, 2, (Point(5.0, 6.0),), None)]


@pytest.mark.parametrize("data, why", [
    ([], "no prompts"),
    ([{"frame": 1, "object": 1}], "object 1 has no points and no box on frame 1"),
    ([{"frame": 1, "name": "car", "box": [10, 10, 5, 20]}], "must have x0 < x1 and y0 < y1"),
    ([{"frame": 1, "object": 0, "box": [0, 0, 5, 5]}], "object ids are whole numbers from 1"),
    ([{"frame": "1", "object": 1, "box": [0, 0, 5, 5]}], "needs an integer frame"),
    ([{"frame": 1, "object": 1, "points": [[1, 2, 5]]}], r"point 1 must be \[x, y, label\]"),
    ([{"frame": 1, "object": 1, "box": [0, 0, 5, 5], "colour": "red"}], "unknown field"),
    ([{"frame": 1, "name": "my car", "box": [0, 0, 5, 5]}], "must be letters, digits and _"),
    ([{"frame": 1, "name": "matte", "box": [0, 0, 5, 5]}], "taken by one of the model's own planes"),
    ([{"frame": 1, "object": 1, "name": "a", "box": [0, 0, 5, 5]},
      {"frame": 2, "object": 1, "name": "b", "box": [0, 0, 5, 5]}], "one name per object"),
    ([{"frame": 1, "object": 1, "box": [0, 0, 5, 5]}, {"frame": 1, "object": 1, "points": [[1, 1, 1]]}],
     "two prompts on frame 1"),
    ([{"frame": 1, "box": [0, 0, 5, 5]}], "needs an object id or a name"),
])
def test_bad_prompts_are_refused_with_the_reason(data, why):
    with pytest.raises(PromptError, match=why):
        from_json(data)


@pytest.mark.parametrize("text, why", [
    ("1001:car", "expected FRAME:NAME:box="),
    ("x:car:box=1,2,3,4", "'x' is not a frame number"),
    ("1001:car:box=1,2,3", r"box must be \[x0, y0, x1, y1\]"),
    ("1001:car:pos=1", "points are x,y"),
    ("1001:car:circle=1,2", "unknown part 'circle=1,2'"),
])
def test_bad_inline_prompts_are_refused_with_the_reason(text, why):
    with pytest.raises(PromptError, match=why):
        parse_inline([text])


def test_prompts_are_checked_against_the_jobs_frames_and_image():
    p = parse_inline(["1001:car:box=120,80,640,400:pos=300,200"])
    check_prompts(p, range(1001, 1011), (1920, 1080))  # fits
    with pytest.raises(PromptError, match="frame 1001 is not one of the job's frames"):
        check_prompts(p, range(1002, 1011), (1920, 1080))
    with pytest.raises(PromptError, match=r"point \(300, 200\) is outside the 200x300 image"):
        check_prompts(p, [1001], (200, 300))
    with pytest.raises(PromptError, match=r"box \[120.0, 80.0, 640.0, 400.0\] is outside the 600x1080 image"):
        check_prompts(parse_inline(["1001:car:box=120,80,640,400"]), [1001], (600, 1080))


def test_a_prompts_file_or_inline_arguments(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"frame": 3, "name": "car", "box": [1, 2, 3, 4]}]))
    assert load([str(path)]).names == {1: "car"}
    assert load(["3:car:box=1,2,3,4"]) == load([str(path)])
    with pytest.raises(PromptError, match="cannot read"):
        load([str(tmp_path / "missing.json")])
    path.write_text("{not json")
    with pytest.raises(PromptError, match="is not JSON"):
        load([str(path)])


def test_nukes_bottom_left_coordinates_become_top_left_pixels():
    # A 1920x1080 plate: Nuke's (100, 1000) is 80 rows below the top; its y axis points up.
    assert from_nuke_point(100, 1000, 1080) == (100.0, 80.0)
    assert from_nuke_point(0, 0, 1080) == (0.0, 1080.0)
    # A box drawn in the Viewer from (120, 680) to (640, 1000): top-left (120, 80), bottom-right (640, 400).
    assert from_nuke_box(120, 680, 640, 1000, 1080) == (120.0, 80.0, 640.0, 400.0)
    assert from_nuke_box(640, 1000, 120, 680, 1080) == (120.0, 80.0, 640.0, 400.0)  # dragged the other way
