"""Content keys: what changes a frame's key, and what does not."""

from __future__ import annotations

import os
import time

from mlfarm.content_keys import FileDigests, digest, file_digest, frame_key, job_base, sequence_keys

from conftest import sample_pixels, write_exr


def test_a_frames_key_follows_content_not_names(tmp_path):
    a, b = tmp_path / "a.exr", tmp_path / "b.exr"
    write_exr(a, sample_pixels(1))
    write_exr(b, sample_pixels(1))
    assert file_digest(a) == file_digest(b)  # same pixels under another name: the same content
    write_exr(b, sample_pixels(2))
    assert file_digest(a) != file_digest(b)

    base = job_base("blur", "1", "w0", {"kernel_size": 3}, {"compression": "zips"})
    assert frame_key(base, [file_digest(a)]) == frame_key(base, [file_digest(a)])
    assert frame_key(base, [file_digest(a)]) != frame_key(base, [file_digest(b)])
    for changed in (job_base("blur", "2", "w0", {"kernel_size": 3}, {"compression": "zips"}),
                    job_base("blur", "1", "w1", {"kernel_size": 3}, {"compression": "zips"}),
                    job_base("blur", "1", "w0", {"kernel_size": 5}, {"compression": "zips"}),
                    job_base("blur", "1", "w0", {"kernel_size": 3}, {"compression": "piz"})):
        assert changed != base
    # Option order does not matter: canonical JSON.
    assert job_base("m", "1", "", {"a": 1, "b": 2}, {}) == job_base("m", "1", "", {"b": 2, "a": 1}, {})


def test_weights_digests_are_computed_once_per_file_version(tmp_path):
    digests = FileDigests()
    w = tmp_path / "weights.pth"
    w.write_bytes(b"x" * 1000)
    first = digests(w)
    w2 = tmp_path / "other.pth"
    w2.write_bytes(b"x" * 1000)
    assert digests(w2) == first
    # Reused while size and mtime stay: a same-size rewrite with the old mtime is not re-read...
    stat = os.stat(w)
    w.write_bytes(b"y" * 1000)
    os.utime(w, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digests(w) == first
    # ...and a file that really changed (new mtime) is.
    time.sleep(0.01)
    w.write_bytes(b"y" * 1000)
    assert digests(w) != first
    assert digests.of_files([w, w2]) == digests.of_files([w2, w]) != digest([])


def test_sequence_keys_change_from_the_changed_frame_on_only():
    base = "b"
    frames = list(range(1001, 1011))
    inputs = {f: f"in{f}" for f in frames}
    prompts = {1001: [{"object": 1, "box": [1, 2, 3, 4]}]}
    keys = sequence_keys(base, frames, inputs, prompts)
    assert len(set(keys.values())) == len(frames)

    corrected = sequence_keys(base, frames, inputs, {**prompts, 1005: [{"object": 1, "points": [[1, 1, 1]]}]})
    assert [f for f in frames if corrected[f] != keys[f]] == list(range(1005, 1011))

    redelivered = sequence_keys(base, frames, {**inputs, 1008: "fixed"}, prompts)
    assert [f for f in frames if redelivered[f] != keys[f]] == [1008, 1009, 1010]

    backward = sequence_keys(base, frames[::-1], inputs, prompts)
    assert backward[1010] != keys[1010]  # each direction has its own chain
