"""`CapturedStep`, the CUDA-graph capture shared by generation's `DecodeStep` and the server's `Engine`.

On the CPU it runs its eager path: the same buffers and the same calls as a replay, `fn` run instead of the
graph. That path is checked here against calling `fn` directly; the decode steps built on it are checked
against plain eager decoding in test_generation (graph-form tests) and test_serve (the static decode form).
The capture itself needs a CUDA device (the last test).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from llama3.generate.graphs import CapturedStep


def affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ y + 1, y.sum(dim=0)


def test_eager_path_copies_inputs_in_and_equals_fn():
    x_buf, y_buf = torch.zeros(2, 3), torch.zeros(3, 4)
    step = CapturedStep(affine, (x_buf, y_buf))
    assert step.graph is None  # CPU inputs: no capture
    x1, y1 = torch.randn(2, 3), torch.randn(3, 4)
    x2, y2 = torch.randn(2, 3), torch.randn(3, 4)

    got1 = step(x1, y1)
    assert torch.equal(x_buf, x1) and torch.equal(y_buf, y1)  # the call reads its inputs from the buffers
    assert all(torch.equal(a, b) for a, b in zip(got1, affine(x1, y1), strict=True))
    got2 = step(x2, y2)  # other inputs, other result: nothing stale from the first call
    assert all(torch.equal(a, b) for a, b in zip(got2, affine(x2, y2), strict=True))
    assert not torch.equal(got1[0], got2[0])


def test_inputs_of_the_wrong_count_are_refused():
    step = CapturedStep(affine, (torch.zeros(2, 3), torch.zeros(3, 4)))
    with pytest.raises(ValueError):
        step(torch.randn(2, 3))


def test_outputs_are_the_callers_own_unless_clone_is_off():
    """A graph's outputs are fixed buffers, overwritten by the next replay; an output that is a view of an
    input buffer is overwritten by the next call's copy. `fn` here returns both kinds, as a replay would."""
    out = torch.zeros(4)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.mul(x, 2, out=out), x[:2]

    step = CapturedStep(fn, (torch.zeros(4),))
    first = step(torch.arange(4.0))
    step(torch.full((4,), 7.0))
    assert torch.equal(first[0], torch.arange(4.0) * 2) and torch.equal(first[1], torch.arange(2.0))

    shared = CapturedStep(fn, (torch.zeros(4),), clone=False)
    first = shared(torch.arange(4.0))
    shared(torch.full((4,), 7.0))
    assert torch.equal(first[0], torch.full((4,), 14.0)) and torch.equal(first[1], torch.full((2,), 7.0))


def test_runs_under_inference_mode_whatever_the_caller():
    """Buffers made under inference mode (as `Llama.generate` makes its step's) take new inputs from a caller
    outside it, and `fn` runs without autograd bookkeeping, as the graph was captured."""
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_inference_mode_enabled())
        return x * 3

    with torch.inference_mode():
        step = CapturedStep(fn, (torch.zeros(3),))
    x = torch.ones(3, requires_grad=True)
    assert torch.equal(step(x), torch.full((3,), 3.0))
    assert seen == [True]


def test_a_failed_capture_warns_once_and_runs_eagerly(monkeypatch):
    def broken_graph():
        raise RuntimeError("capture is not supported here")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken_graph)
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*capture is not supported here.*eagerly"):
        step = CapturedStep(affine, (torch.zeros(2, 3), torch.zeros(3, 4)), capture=True)
    assert step.graph is None
    x, y = torch.randn(2, 3), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more warnings, whatever the number of calls
        for _ in range(3):
            got = step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(got, affine(x, y), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replay_gives_the_eager_results_and_draws():
    """A captured step that samples from its own generator: replays draw what eager calls draw."""

    def noisy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x * 2 + torch.rand(x.shape, device=x.device, generator=generator)

    results = []
    for capture in (True, False):
        generator = torch.Generator(device="cuda")
        step = CapturedStep(
            lambda x, generator=generator: noisy(x, generator),
            (torch.zeros(5, device="cuda"),),
            (generator,),
            capture=capture,
        )
        assert (step.graph is not None) == capture
        generator.manual_seed(3)  # after the capture, whose warm-up draws
        results.append([step(torch.full((5,), float(i), device="cuda")) for i in range(3)])
    for replayed, eager in zip(*results, strict=True):
        assert torch.equal(replayed, eager)
    assert not torch.equal(results[0][0], results[0][1] - 2)  # a fresh draw each replay
