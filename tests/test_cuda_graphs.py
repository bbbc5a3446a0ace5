"""CUDA graphs for fixed-shape model steps (models/cuda_graphs.py): replays give what eager runs
give, for every new input, per thread and per shape; anything that cannot be captured runs
eagerly. The CPU path (CI) calls the function as it is; the rest needs a CUDA GPU."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from mlfarm.models.cuda_graphs import GraphedFunction

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
        return self.fn(x)


def small_net(device: str) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1)).to(device).eval()


def test_off_cuda_the_function_runs_every_time_and_no_graph_is_kept():
    net = small_net("cpu")
    fn = Counting(lambda x: {"y": net(x), "n": x.shape[0]})
    graphed = GraphedFunction(fn)
    for k in range(4):
        x = torch.rand(2, 3, 8, 8) + k
        with torch.inference_mode():
            out = graphed(x, config=("a",))
            torch.testing.assert_close(out["y"], net(x))
        assert out["n"] == 2
    assert fn.calls == 4
    assert graphed.graphs == 0


@cuda
def test_replays_follow_each_new_input_and_match_eager():
    net = small_net("cuda")
    fn = Counting(lambda x: (net(x), {"sum": x.sum(dim=(1, 2, 3))}))
    graphed = GraphedFunction(fn, warm_calls=1)
    with torch.inference_mode():
        for k in range(5):
            x = torch.rand(2, 3, 16, 16, device="cuda") * (k + 1)
            y, extra = graphed(x)
            torch.testing.assert_close(y, net(x))
            torch.testing.assert_close(extra["sum"], x.sum(dim=(1, 2, 3)))
    assert graphed.graphs == 1
    # one warm call, one on the capture stream, one captured; then replays only
    assert fn.calls == 3


@cuda
def test_each_shape_and_config_has_its_own_graph_and_old_ones_are_dropped():
    net = small_net("cuda")
    graphed = GraphedFunction(lambda x: net(x), warm_calls=0, per_thread=2)
    with torch.inference_mode():
        a = torch.rand(1, 3, 8, 8, device="cuda")
        b = torch.rand(2, 3, 8, 8, device="cuda")
        torch.testing.assert_close(graphed(a, config=1), net(a))
        torch.testing.assert_close(graphed(a, config=2), net(a))
        assert graphed.graphs == 2
        torch.testing.assert_close(graphed(b, config=1), net(b))
        assert graphed.graphs == 2  # the oldest (a, 1) went
        torch.testing.assert_close(graphed(a, config=2), net(a))


@cuda
def test_a_function_that_cannot_be_captured_runs_eagerly(caplog):
    net = small_net("cuda")

    def syncs(x):  # .item() waits for the GPU: not allowed while capturing
        scale = float(x.mean().item())
        return net(x) * scale

    graphed = GraphedFunction(syncs, warm_calls=0)
    with caplog.at_level(logging.WARNING, logger="mlfarm.models.cuda_graphs"), torch.inference_mode():
        for _ in range(3):
            x = torch.rand(1, 3, 8, 8, device="cuda")
            torch.testing.assert_close(graphed(x), syncs(x))
    assert graphed.graphs == 0
    assert "CUDA graph capture failed" in caplog.text


@cuda
def test_threads_keep_their_own_graphs_on_their_own_streams():
    net = small_net("cuda")
    graphed = GraphedFunction(lambda x: net(x), warm_calls=1)
    errors: list[BaseException] = []
    counts: list[int] = []

    def lane(seed: int) -> None:
        try:
            stream = torch.cuda.Stream()
            gen = torch.Generator(device="cuda").manual_seed(seed)
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(20):
                    x = torch.rand(2, 3, 32, 32, device="cuda", generator=gen)
                    y = graphed(x).clone()
                    torch.testing.assert_close(y, net(x))
            counts.append(graphed.graphs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert counts == [1, 1]
