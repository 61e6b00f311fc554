"""The Triton backend computes what the PyTorch backend computes (kernels in the interpreter on CPU,
compiled on a CUDA device when there is one)."""

from __future__ import annotations

import pytest
import torch
from conftest import fill_cache_with_garbage

from llama3 import Llama, Transformer
from llama3.backends import TorchOps, TritonOps, get_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def decode_logits(model: Transformer, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then decode the rest one at a time; the logits of every position."""
    B, T = tokens.shape
    model.setup_cache(B, 64)
    out = [model(tokens[:, :prefill], torch.arange(prefill, device=tokens.device))]
    for t in range(prefill, T):
        out.append(model(tokens[:, t : t + 1], torch.full((B, 1), t, device=tokens.device)))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", ["llama3-gqa", "mqa", "llama3.1-scaled"])
def test_triton_backend_matches_torch_backend(tiny_hf, variant):
    d, _ = tiny_hf(variant)
    torch_model = Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend="torch")
    triton_model = Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend="triton")
    assert torch_model.ops is TorchOps and triton_model.ops is TritonOps
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        expected = decode_logits(torch_model, tokens, prefill=8)
        got = decode_logits(triton_model, tokens, prefill=8)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_ragged_decode_step_matches(tiny_hf):
    """Rows at different cache positions in one decode step (right-padded ragged batch)."""
    d, _ = tiny_hf("llama3-gqa")
    models = [
        Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=b) for b in ("torch", "triton")
    ]
    tokens = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pos = torch.tensor([[4], [9], [6]], device=DEVICE)
    outs = []
    with torch.no_grad():
        for m in models:
            m.setup_cache(3, 32)
            m(tokens, torch.arange(10, device=DEVICE))
            outs.append(m(tokens[:, :1], pos))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


class TokenIds:
    """Generation on token ids needs only the vocabulary size and the stop tokens of a tokenizer."""

    n_words, stop_tokens = 512, []


def test_graph_form_decode_step_matches_torch_backend(tiny_hf):
    """The triton decode step in the form a CUDA graph captures (fixed buffers, the length read on the
    device by the kernels), with garbage in the cache slots no row has reached yet. On CUDA it is
    captured and replayed."""
    d, _ = tiny_hf("llama3-gqa")
    load = lambda backend: Transformer.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend=backend)  # noqa: E731
    eager = Llama(load("torch"), TokenIds(), cuda_graphs=False)
    graph_form = Llama(load("triton"), TokenIds(), cuda_graphs=True)
    fill_cache_with_garbage(graph_form.model, batch=2, slots=256)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert graph_form.generate(prompts, 8, temperature=0) == eager.generate(prompts, 8, temperature=0)
    assert all(step.static and (step.graph is not None) == (DEVICE == "cuda") for step in graph_form._steps.values())


def test_backend_choice():
    assert get_ops("auto", "cpu") is TorchOps
    assert get_ops("torch", "cpu") is TorchOps
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        get_ops("cuda", "cpu")


def test_missing_kernels_package_is_explained(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama3.kernels" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install -e"):
        get_ops("triton", "cpu")
    with pytest.warns(UserWarning, match="PyTorch backend on CUDA"):
        assert get_ops("auto", "cuda") is TorchOps
