"""Hook points (llama3.model.hooks) against transformers: hidden states (`output_hidden_states`), attention
probabilities (`output_attentions`, eager attention), a zeroed head against zeroed `o_proj` columns, the logit
lens against transformers' own norm and `lm_head`; patching during generation; `llama3 inspect` writes pictures."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CONFIGS, hf_greedy, run_main, save_tiny_hf

from llama3.generate.llama import Llama
from llama3.model.backends import TorchOps
from llama3.model.hooks import add, hook_names, logit_lens, zero
from llama3.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama3-gqa", "llama3.1-scaled", "llama3.2-tied"])
def pair(request, tmp_path_factory):
    """(ours, transformers' model with eager attention, tokens (2, 9)), fp32."""
    d = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf(d, **TINY_CONFIGS[request.param])
    hf.set_attn_implementation("eager")  # SDPA returns no probabilities
    ours = Transformer.from_pretrained(d, device="cpu", dtype=torch.float32, progress=False)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    return ours, hf, tokens


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, rtol=0, atol=atol)


@torch.no_grad()
def test_every_layers_hidden_states_equal_transformers(pair):
    ours, hf, tokens = pair
    ref = hf(tokens, output_hidden_states=True)
    logits, cache = ours.run_with_cache(tokens)
    L = len(ours.layers)
    assert sorted(cache) == sorted(hook_names(L))
    # transformers: hidden_states[i] is block i's input; the last one has been through the final norm
    for i in range(L):
        assert close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i]), i
    for i in range(L - 1):
        assert close(cache[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1]), i
    assert close(cache["ln_final.hook_normalized"], ref.hidden_states[L])
    assert close(logits, ref.logits)


@torch.no_grad()
def test_attention_probabilities_equal_transformers_eager(pair):
    ours, hf, tokens = pair
    ref = hf(tokens, output_attentions=True).attentions  # per layer (B, H, T, T)
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(ours.layers))]
    _, cache = ours.run_with_cache(tokens, names)
    for i, name in enumerate(names):
        assert close(cache[name], ref[i]), name
    # the cached path: a prefill of T - 1 tokens, then one decode step attending over the cache (masked)
    T = tokens.shape[1]
    ours.setup_cache(2, 16)
    seen = {}
    with ours.hooks({name: lambda x, hook: seen.__setitem__(hook.name, x) for name in names}):
        ours(tokens[:, :-1], torch.arange(T - 1), kv_len=T - 1)
        assert all(close(seen[n], ref[i][:, :, :-1, :-1]) for i, n in enumerate(names))
        ours(tokens[:, -1:], torch.tensor([T - 1]), kv_len=T)
        assert all(close(seen[n], ref[i][:, :, -1:]) for i, n in enumerate(names))


@torch.no_grad()
def test_zeroing_one_head_equals_transformers_with_its_o_proj_columns_zeroed(pair):
    ours, hf, tokens = pair
    layer, head, D = 1, 2, ours.args.head_dim
    zeroed = copy.deepcopy(hf)
    zeroed.model.layers[layer].self_attn.o_proj.weight[:, head * D : (head + 1) * D] = 0
    with ours.hooks({f"blocks.{layer}.attn.hook_z": zero(head=head)}):
        got = ours(tokens)
    assert close(got, zeroed(tokens).logits)
    assert not close(got, hf(tokens).logits, atol=1e-3)  # the head mattered
    assert close(ours(tokens), hf(tokens).logits)  # and the hook is gone after the block


@torch.no_grad()
def test_a_patched_residual_changes_exactly_the_positions_from_it_on(pair):
    ours, _, tokens = pair
    p = 4
    delta = torch.randn(ours.args.dim, generator=torch.Generator().manual_seed(2))
    with ours.hooks({}):  # the same (reference) ops as the patched forward
        base = ours(tokens)
        _, before = ours.run_with_cache(tokens, ["blocks.0.hook_resid_mid"])
    with ours.hooks({"blocks.0.hook_resid_mid": add(delta, pos=p)}):
        patched = ours(tokens)
        _, after = ours.run_with_cache(tokens, ["blocks.0.hook_resid_mid"])  # nested: the cache holds the patch
    changed = (patched - base).abs().amax(dim=-1)  # (B, T)
    assert (changed[:, :p] == 0).all()
    assert (changed[:, p:] > 1e-4).all()
    expected = before["blocks.0.hook_resid_mid"].clone()
    expected[:, p] += delta
    assert torch.equal(after["blocks.0.hook_resid_mid"], expected)


@torch.no_grad()
def test_logit_lens_is_each_hidden_state_through_transformers_norm_and_lm_head(pair):
    ours, hf, tokens = pair
    hidden = hf(tokens, output_hidden_states=True).hidden_states
    L = len(ours.layers)
    lens = logit_lens(ours, tokens)
    assert lens.shape == (L + 1, *tokens.shape, ours.args.vocab_size)
    for i in range(L):
        assert close(lens[i], hf.lm_head(hf.model.norm(hidden[i]))), i
    assert close(lens[L], hf.lm_head(hidden[L]))  # transformers' last hidden state is already normed


class Refuses(TorchOps):
    """A backend none of whose seams may run: a hooked forward must not touch it."""

    name = "refuses"

    def _refuse(*_args, **_kwargs):
        raise AssertionError("the backend ran under hooks")

    linear = rope_and_cache = attention = swiglu = run_block = staticmethod(_refuse)


@torch.no_grad()
def test_hooks_run_the_reference_ops_whatever_the_backend(pair):
    ours, hf, tokens = pair
    ours.set_ops(Refuses)
    try:
        logits, _ = ours.run_with_cache(tokens, ["blocks.0.attn.hook_pattern"])
        assert close(logits, hf(tokens).logits)
        with pytest.raises(AssertionError, match="backend ran"):
            ours(tokens)  # the backend is back once the hooks are gone
    finally:
        ours.set_ops(TorchOps)


def test_an_unknown_hook_point_is_named(pair):
    ours, _, tokens = pair
    with pytest.raises(ValueError, match=r"no hook point 'blocks\.2\.hook_resid_pre': this model has blocks 0\.\.1"):
        ours.run_with_cache(tokens, ["blocks.2.hook_resid_pre"])
    with pytest.raises(ValueError, match="head=0: blocks.0.hook_resid_post has no heads"):
        with ours.hooks({"blocks.0.hook_resid_post": zero(head=0)}):
            ours(tokens)
    assert ours.hooked is None and ours.layers[0].hook.__name__ == "no_hook"  # restored after the error


@pytest.fixture(scope="module")
def llm(tiny_llama3):
    return Llama.from_pretrained(tiny_llama3[0], device="cpu", dtype=torch.float32, cuda_graphs=True)


def test_generation_under_a_zeroed_head_equals_transformers(llm, tiny_llama3):
    hf = tiny_llama3[1]
    zeroed = copy.deepcopy(hf)
    D = llm.model.args.head_dim
    with torch.no_grad():
        zeroed.model.layers[0].self_attn.o_proj.weight[:, D : 2 * D] = 0
    prompt = [128000, 791, 6864, 315, 9822, 374]
    with llm.model.hooks({"blocks.0.attn.hook_z": zero(head=1)}):
        patched = llm.generate([prompt], 8, temperature=0, stop_tokens=[])[0]
    assert patched == hf_greedy(zeroed, prompt, 8)
    assert llm.generate([prompt], 8, temperature=0, stop_tokens=[])[0] == hf_greedy(hf, prompt, 8)
    assert patched != hf_greedy(hf, prompt, 8)


def test_a_patch_at_a_decode_position_hits_that_position(llm):
    """Positions are absolute: a patch at position p (a decode step's token, not its index 0 in that step)
    changes the tokens from p on, and generation equals one full forward over its own output under the patch."""
    prompt = [128000, 791, 6864, 315, 9822]
    p = len(prompt) + 2  # the third decode step's input
    delta = 30 * torch.randn(llm.model.args.dim, generator=torch.Generator().manual_seed(3))
    patch = {"blocks.0.hook_resid_post": add(delta, pos=p)}
    plain = llm.generate([prompt], 6, temperature=0, stop_tokens=[])[0]
    with llm.model.hooks(patch):
        patched = llm.generate([prompt], 6, temperature=0, stop_tokens=[])[0]
        with torch.no_grad():
            full = llm.model(torch.tensor([prompt + patched[:-1]]))[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert patched == full
    assert patched[:3] == plain[:3] and patched[3:] != plain[3:]


@pytest.mark.parametrize("what", [["--attention", "1"], ["--logit-lens"]])
def test_inspect_writes_a_png(what, tiny_llama3, tmp_path, monkeypatch, capsys):
    from matplotlib.image import imread

    out = tmp_path / "picture.png"
    args = ["inspect", "The capital of France", "--model", str(tiny_llama3[0]), "--dtype", "float32", "-q"]
    code, _, err = run_main(monkeypatch, capsys, *args, *what, "--out", str(out))
    assert code == 0, err
    image = imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 200 and image[..., :3].std() > 0.05  # not blank


def test_inspect_errors_name_the_flag(tiny_llama3, tmp_path, monkeypatch, capsys):
    args = ["inspect", "Hi", "--model", str(tiny_llama3[0]), "-q", "--out", str(tmp_path / "x.png")]
    code, _, err = run_main(monkeypatch, capsys, *args, "--attention", "2")
    assert code == 1 and "--attention 2: the model has layers 0 to 1" in err
    code, _, err = run_main(monkeypatch, capsys, *args, "--attention", "0.4")
    assert code == 1 and "--attention 0.4: the model has heads 0 to 3" in err
    code, _, err = run_main(monkeypatch, capsys, *args, "--attention", "first")
    assert code == 2 and "argument --attention: expected LAYER or LAYER.HEAD" in err
    monkeypatch.setattr("llama3.cli.inspect.find_spec", lambda name: None)
    code, _, err = run_main(monkeypatch, capsys, *args, "--logit-lens")
    assert code == 1 and err.strip().splitlines()[-1].endswith("(pip install 'llama3[plot]')")
