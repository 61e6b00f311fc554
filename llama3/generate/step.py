from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llama3.generate.graphs import CapturedStep
from llama3.generate.params import SamplingParams
from llama3.generate.sampling import sample
from llama3.model.transformer import Transformer, TransformerBlock


def compiled_block() -> Callable:
    """`TransformerBlock.forward` through torch.compile, for the decode step of `Llama(compile=True)`.

    One graph serves every layer (the blocks differ only in their weights, which dynamo passes as inputs),
    so compiling takes seconds rather than a minute for a whole model, and decode runs each block as a few
    fused C++ loops around the matmuls instead of dozens of small ops. Shapes are static (dynamic ones
    measured 4-10x slower here): each batch size and `attention_window` compiles again; dynamo keeps 8
    variants, then runs the block eagerly.

    Close to eager decode, not bit-identical: inductor rounds to bf16/fp16 where eager PyTorch does
    (`emulate_precision_casts`), but two float32 reductions round differently, by about 1 ulp: inductor's
    own RMSNorm loop sums the squares in another order, and SDPA's CPU kernel groups its sums (softmax
    denominator, probabilities @ V) by the number of slots, here the padded window rather than the slots in
    use. A later bf16 rounding can make that a bf16 step of a hidden state, and greedy decoding then picks
    another token where the top two logits are that close (the embedded SmolLM2 in int4: "Once upon a time"
    from its 14th token). Running both reductions as eager's inside the graph (opaque custom ops) made the
    logits equal but the step slower than eager (27 against 31 tok/s; 38 as here), so they stay fused.
    """
    return torch.compile(TransformerBlock.forward, dynamic=False, options={"emulate_precision_casts": True})


def attention_window(kv_len: int, cache_len: int) -> int:
    """The cache slots a compiled step attends over: `kv_len` rounded up to 256 * 2^k, at most the cache.

    A static shape for many steps (a chat compiles a few windows, not one per token), and past 256 slots
    never more than twice those in use: attention over empty masked slots is not free (SmolLM2 in int4 on
    the 2-core CPU: 7 ms more a step for each 256)."""
    window = 256
    while window < kv_len:
        window *= 2
    return min(window, cache_len)


class DecodeStep:
    """One decode step (forward of one token per row + sampling), eager or as a replayed CUDA graph.

    With `static=True` the step reads its tokens and positions from fixed buffers and attends over
    the whole cache (no host-known `kv_len`): the form a CUDA graph captures. On CUDA it is then
    captured once and replayed (`CapturedStep`); elsewhere, or if the capture fails, the same body runs
    eagerly (how tests check it on CPU).
    Otherwise it attends over the `kv_len` slots in use, or, with `run_block` (`compiled_block`, which
    runs each block), over their `attention_window`.
    """

    def __init__(
        self,
        model: Transformer,
        batch_size: int,
        params: SamplingParams,
        generator,
        static: bool,
        run_block: Callable | None = None,
    ):
        self.model, self.params, self.generator = model, params, generator
        self.static = static
        self.run_block = run_block
        self.captured: CapturedStep | None = None
        # the tokens each row has seen, on the device (repetition_penalty only): `start` sets the prompt's,
        # each step adds the token it reads (the last one sampled), so a captured graph needs no host sync
        penalty = params.repetition_penalty != 1
        vocab = model.args.vocab_size
        self.seen = torch.zeros(batch_size, vocab, dtype=torch.bool, device=model.inv_freq.device) if penalty else None
        # the tokens each row has generated, counted (presence / frequency penalties), kept the same way
        counting = params.presence_penalty != 0 or params.frequency_penalty != 0
        self.counts = torch.zeros(batch_size, vocab, device=model.inv_freq.device) if counting else None
        if static:
            device = model.inv_freq.device
            tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            # slot 0: capture runs before the prefill, which overwrites whatever the warm-up wrote there
            input_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            generators = () if generator is None else (generator,)
            self.captured = CapturedStep(self._static_body, (tokens, input_pos), generators)

    def _eager(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None, run_block=None) -> Tensor:
        logits = self.model(tokens, input_pos, kv_len=kv_len, run_block=run_block)
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=self.counts.dtype))
        return sample(logits[:, -1], self.params, self.generator, self.seen, self.counts)

    def _static_body(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """What the graph captures: fixed input buffers, and every cache slot (masked) in attention."""
        return self._eager(tokens, input_pos, run_block=self.run_block)

    def start(self, seen: Tensor | None) -> None:
        """A new generation: `seen` (B, V): each row's prompt tokens (for repetition_penalty); no token generated."""
        if self.seen is not None:
            self.seen.copy_(seen)
        if self.counts is not None:
            self.counts.zero_()

    def __call__(self, tokens: Tensor, input_pos: Tensor, kv_len: int) -> Tensor:
        """Next tokens (B,) after `tokens` (B, 1) at slots `input_pos` (B, 1), all below `kv_len`."""
        if not self.static:
            if self.run_block is None:
                return self._eager(tokens, input_pos, kv_len)
            return self._eager(tokens, input_pos, attention_window(kv_len, self.model.max_seq_len), self.run_block)
        return self.captured(tokens, input_pos)
