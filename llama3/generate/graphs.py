"""One CUDA-graph capture, shared by the decode step of generation (`DecodeStep`) and of the server (`Engine`).

A CUDA graph records the kernels one call of a function launches and replays them later at the same
addresses: a replay skips Python and the launch of each small kernel, which is most of the time a decode
step of a small batch takes. So the function reads its inputs from fixed buffers (a call copies its inputs
in), and its outputs land in fixed buffers that the next replay overwrites. The recipe is PyTorch's
("CUDA Graphs" in the CUDA semantics notes, https://pytorch.org/docs/stable/notes/cuda.html): warm up on a
side stream (lazy initialisation, kernel selection and allocations stay out of the graph), then capture.

Off CUDA, or if the capture fails, `CapturedStep` calls the function eagerly on the same buffers: the same
computation, so the same numbers, only slower. That is also how the tests run it on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Outputs = Tensor | tuple[Tensor, ...]


class CapturedStep:
    """`fn(*static_inputs)` captured once in a CUDA graph, then called as `step(*inputs)`.

    A call copies `inputs` into `static_inputs` (same shapes), replays the graph and returns its outputs,
    cloned when `clone` is set (the default): the graph's output buffers are overwritten by the next call,
    and an output that is a view of an input buffer by the next copy. With `clone=False` the caller must be
    done with the outputs before the next call. The graph is captured when `capture` is set (by default: when
    the inputs are on CUDA); otherwise, or when the capture fails (with one warning, naming why), `fn` runs
    eagerly on the same buffers.

    `generators`: the `torch.Generator`s `fn` draws from; registered with the graph so that each replay
    advances them as an eager call would. The capture's warm-up calls `fn` twice and so draws from them:
    seed them after building the step. `fn` always runs under `torch.inference_mode` (the graph records no
    autograd bookkeeping, and eager calls do the same), so the inputs must not need gradients.
    """

    def __init__(
        self,
        fn: Callable[..., Outputs],
        static_inputs: Sequence[Tensor],
        generators: Sequence[torch.Generator] = (),
        clone: bool = True,
        capture: bool | None = None,
    ):
        self.fn = fn
        self.static_inputs = tuple(static_inputs)
        self.clone = clone
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_outputs: Outputs | None = None
        if capture is None:
            capture = all(t.is_cuda for t in self.static_inputs)
        if capture:
            try:
                self._capture(generators)
            except Exception as e:  # of any kind (CUDA, Triton, a missing attribute): only the speed differs
                self.graph, self.static_outputs = None, None
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2)

    @torch.inference_mode()
    def _capture(self, generators: Sequence[torch.Generator]) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            self.static_outputs = self.fn(*self.static_inputs)
        self.graph = graph

    @torch.inference_mode()
    def __call__(self, *inputs: Tensor) -> Outputs:
        for buffer, x in zip(self.static_inputs, inputs, strict=True):
            buffer.copy_(x)
        if self.graph is None:
            outputs = self.fn(*self.static_inputs)
        else:
            self.graph.replay()
            outputs = self.static_outputs
        if not self.clone:
            return outputs
        return outputs.clone() if isinstance(outputs, Tensor) else tuple(t.clone() for t in outputs)
