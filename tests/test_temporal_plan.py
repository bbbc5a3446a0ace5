"""How windows and sequences divide a shot (pure; the farm tests run them through real workers)."""

from __future__ import annotations

from mlfarm.temporal import BACKWARD, FORWARD, origin, resume_point, split, window_reads, window_sources


def test_windows_read_neighbours_and_clamp_where_frames_are_missing():
    on_disk = set(range(1001, 1011)) - {1005}
    exists = on_disk.__contains__
    assert window_sources(1003, 1, exists) == [1002, 1003, 1004]
    assert window_sources(1001, 1, exists) == [1001, 1001, 1002]  # shot start: clamped
    assert window_sources(1010, 1, exists) == [1009, 1010, 1010]  # shot end
    assert window_sources(1004, 1, exists) == [1003, 1004, 1004]  # a hole: the nearest towards f
    assert window_sources(1006, 2, exists) == [1004, 1006, 1006, 1007, 1008]
    # A chunk of 1003-1004 reads 1002 and 1004 for context, also when only 1003-1004 were submitted.
    assert window_reads([1003, 1004], 1, exists) == {1003: [1002, 1003, 1004], 1004: [1003, 1004, 1004]}


def test_sequences_run_forward_and_backward_from_the_first_prompt():
    frames = list(range(1001, 1011))
    assert origin(frames, [1004, 1008]) == 1004 and origin(frames, []) == 1001
    assert split(frames, 1004) == {FORWARD: list(range(1004, 1011)), BACKWARD: [1003, 1002, 1001]}
    assert split(frames, 1001) == {FORWARD: frames}


def test_a_sequence_resumes_after_the_last_frame_it_wrote():
    frames = list(range(1001, 1011))
    written = {1004, 1005, 1006}
    # Forward from 1004, killed after writing 1006: resume from 1006's planes, render 1007-1010.
    assert resume_point(FORWARD, frames, 1004, range(1007, 1011), written.__contains__) == (1006, [1007, 1008, 1009,
                                                                                                  1010])
    # Nothing written yet: from the prompts.
    assert resume_point(FORWARD, frames, 1004, range(1004, 1011), set().__contains__) == (None, list(range(1004, 1011)))
    # Backward starts at the prompted frame (forward writes it), then goes down.
    assert resume_point(BACKWARD, frames, 1004, [1003, 1002, 1001], set().__contains__) == (None, [1004, 1003, 1002,
                                                                                                  1001])
    assert resume_point(BACKWARD, frames, 1004, [1001], {1003, 1002}.__contains__) == (1002, [1001])
    # Retrying one failed frame in the middle: seeded from the frame before it, only as far as it.
    assert resume_point(FORWARD, frames, 1004, [1008], (written | {1007}).__contains__) == (1007, [1008])
    # Written frames after a gap are passed through, not skipped: the state must go through them.
    assert resume_point(FORWARD, frames, 1004, [1006, 1009], {1004, 1005, 1007, 1008}.__contains__) == (
        1005, [1006, 1007, 1008, 1009])
    assert resume_point(FORWARD, frames, 1004, [1002], written.__contains__) == (None, [])
