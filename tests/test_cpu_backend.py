"""The CPU backend's lean decode step (`CpuOps.run_block`) computes what the reference block computes
(`TransformerBlock.forward` under `TorchOps`), in at most 40 aten ops per layer."""

from __future__ import annotations

import pytest
import torch

from llama3 import Llama, Transformer
from llama3.eval.bench import aten_ops_per_layer
from llama3.model.backends import CpuOps, TorchOps, get_ops

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TokenIds:
    n_words, stop_tokens = 512, []


def decode(model: Transformer, tokens: torch.Tensor, prompt_lens: list[int], steps: int) -> torch.Tensor:
    """Prefill each row's prompt (right-padded), then `steps` one-token steps at each row's own slot, feeding
    tokens[:, len + i]: the logits (B, steps, vocab) of the decode steps."""
    B = tokens.shape[0]
    L = max(prompt_lens)
    model.setup_cache(B, 64)
    pos = torch.tensor(prompt_lens)[:, None]
    model(tokens[:, :L], torch.arange(L), kv_len=L)
    out = []
    for i in range(steps):
        out.append(model(tokens.gather(1, pos), pos, kv_len=L + i + 1))
        pos = pos + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    ("variant", "prompt_lens"), [("llama3-gqa", [5]), ("llama3-gqa", [3, 9, 6]), ("llama3.1-scaled", [7, 2])]
)
@torch.inference_mode()
def test_lean_decode_step_equals_the_reference(tiny_hf, variant, prompt_lens):
    """Batch 1 and ragged batches (rows at different slots in one step), GQA, rope scaling; the cache slots past
    each row's position hold another row's (or a longer prompt's) values, which the mask must hide."""
    d, _ = tiny_hf(variant)
    model = Transformer.from_pretrained(d, dtype=torch.float32, backend="torch")
    tokens = torch.randint(0, 512, (len(prompt_lens), 20), generator=torch.Generator().manual_seed(0))
    expected = decode(model, tokens, prompt_lens, 6)
    model.set_ops(CpuOps)
    got = decode(model, tokens, prompt_lens, 6)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_tokens_equal_the_reference(tiny_hf):
    d, _ = tiny_hf("mqa")
    load = lambda backend: Transformer.from_pretrained(d, dtype=torch.float32, backend=backend)  # noqa: E731
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    reference = Llama(load("torch"), TokenIds(), cuda_graphs=False).generate(prompts, 10, temperature=0)
    lean = Llama(load("cpu"), TokenIds(), cuda_graphs=False)
    assert lean.model.ops is CpuOps
    assert lean.generate(prompts, 10, temperature=0) == reference


@pytest.mark.parametrize("quantize", [None, "int4"])
@torch.inference_mode()
def test_lean_bfloat16_decode_step_equals_the_reference(tiny_hf, quantize):
    """16-bit activations (the CPU's int4 default): RoPE and the cache in fp32, rounded where the reference rounds;
    the int4 kernel called without the module's reshapes."""
    d, _ = tiny_hf("llama3-gqa")
    model = Transformer.from_pretrained(d, dtype=torch.bfloat16, backend="torch", quantize=quantize)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    expected = decode(model, tokens, [4, 8], 5)
    model.set_ops(CpuOps)
    got = decode(model, tokens, [4, 8], 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_decode_step_is_at_most_40_aten_ops_per_layer(tiny_hf, dtype):
    d, _ = tiny_hf("llama3-gqa")
    model = Transformer.from_pretrained(
        d, dtype=dtype, backend="cpu", quantize="int4" if dtype == torch.bfloat16 else None
    )
    lean = aten_ops_per_layer(model)
    model.set_ops(TorchOps)
    reference = aten_ops_per_layer(model)
    assert lean <= 40 < reference, (lean, reference)  # the reference's count: the profile sees the ops


@torch.inference_mode()
def test_a_hooked_block_runs_the_reference(tiny_hf):
    """Tensor parallelism's all-reduces are forward hooks on Attention and FeedForward: the lean step, which
    calls neither module, hands such a block to the reference so that the hooks run."""
    d, _ = tiny_hf("llama3-gqa")
    model = Transformer.from_pretrained(d, dtype=torch.float32, backend="cpu")
    calls = []
    model.layers[1].feed_forward.register_forward_hook(lambda *_: calls.append(1))
    decode(model, torch.arange(12)[None], [6], 2)
    assert len(calls) == 3  # the prefill and both decode steps


@torch.inference_mode()
def test_a_block_changed_between_steps_is_read_again(tiny_hf):
    """The lean step gathers each block's weights and cache once, not at every step: a projection replaced after
    a decode (an adapter's wrapper, a new weight) and a new cache (`setup_cache` for another batch) must be what
    the next steps run."""
    d, _ = tiny_hf("llama3-gqa")
    lean, reference = (Transformer.from_pretrained(d, dtype=torch.float32, backend=b) for b in ("cpu", "torch"))
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    decode(lean, tokens[:1], [5], 2)
    for model in (lean, reference):
        ffn = model.layers[1].feed_forward
        torch.manual_seed(4)
        ffn.w2 = torch.nn.Linear(ffn.w2.in_features, ffn.w2.out_features, bias=False)
    torch.testing.assert_close(decode(lean, tokens[:1], [5], 3), decode(reference, tokens[:1], [5], 3))
    torch.testing.assert_close(decode(lean, tokens, [5, 7], 3), decode(reference, tokens, [5, 7], 3))


def test_decode_steps_in_and_out_of_inference_mode(tiny_hf):
    """The lean step's cache views, gathered under torch.inference_mode, must not be written by a step outside it
    in grad mode (PyTorch forbids it): a step with autograd on after one under inference_mode gives the reference's
    logits."""
    d, _ = tiny_hf("llama3-gqa")
    lean, reference = (
        Transformer.from_pretrained(d, dtype=torch.bfloat16, backend=b, quantize="int4") for b in ("cpu", "torch")
    )
    tokens = torch.arange(10)[None]
    out = {}
    for name, model in (("lean", lean), ("reference", reference)):
        model.setup_cache(1, 16)
        with torch.inference_mode():
            model(tokens[:, :6], torch.arange(6), kv_len=6)
            model(tokens[:, 6:7], torch.tensor([[6]]), kv_len=7)
        out[name] = model(tokens[:, 7:8], torch.tensor([[7]]), kv_len=8).detach()  # grad mode, as in a notebook
    torch.testing.assert_close(out["lean"], out["reference"], rtol=0, atol=0)


def test_each_thread_keeps_its_own_decode_step():
    """A step's shared state (the mask, the slots) is per thread: a step another thread begins meanwhile (a server's
    engine beside a caller's `generate`) does not change what this thread's layers read."""
    import threading

    from llama3.model.backends import _DecodeStep

    def begin(kv_len: int, pos: int):
        mask = torch.ones(1, 1, 1, kv_len, dtype=torch.bool)
        return _DecodeStep.of(torch.zeros(1, 1, 1, 4), mask, torch.tensor([[pos]]))

    mine = begin(5, 4)
    other = []
    thread = threading.Thread(target=lambda: other.append(begin(9, 8)))
    thread.start()
    thread.join()
    assert mine.mask.shape[-1] == 5 and mine.slot.tolist() == [4]  # what this thread's next layer reads
    assert other[0].mask.shape[-1] == 9 and other[0].slot.tolist() == [8]


def test_the_cpu_backend_is_the_default_on_the_cpu():
    assert get_ops("auto", "cpu") is CpuOps
    with pytest.raises(RuntimeError, match="backend='cpu' runs on the CPU, not cuda"):
        get_ops("cpu", "cuda")
