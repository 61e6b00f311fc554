"""Bad input gives a named error, not a crash, a huge allocation or a silent wrong answer.

Each class of bad input is tried over several cases: checkpoint files with the right name and the
wrong contents, device strings, non-finite and out-of-range generation settings, wrong but iterable
types, token tensors the model cannot embed, and prompts longer than the context. Each check asks
for the exception type the library documents and a message that names what is wrong (the file, the
tensor, the parameter, the value). Values exactly on a boundary must be accepted, and where there is
an independent reference (transformers) they must give its answer.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch
from conftest import hf_greedy

import llama3
from llama3 import Llama, Tokenizer, Transformer
from llama3.checks import CheckpointError, ConfigError
from llama3.text.tokenizer import TokenizerError

VOCAB = 512  # the small checkpoint's vocabulary (the file-format and forward tests)
CONTEXT = 256  # conftest's tiny config: max_position_embeddings
BOS, HELLO = 128000, 9906


# --- checkpoints, each built once per module -----------------------------------------------------


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    """A tiny HF checkpoint (vocabulary 512) and its fp32 transformers model. initializer_range 0.1, as
    in test_model.py, so that a wrong embedding row would move the logits far past the tolerance."""
    from conftest import save_tiny_hf

    d = tmp_path_factory.mktemp("small-hf")
    return d, save_tiny_hf(d, initializer_range=0.1)


@pytest.fixture
def hf_copy(small_hf, tmp_path):
    """A private copy of the small checkpoint, to damage one file of."""
    d = tmp_path / "ckpt"
    shutil.copytree(small_hf[0], d)
    return d


@pytest.fixture(scope="module")
def small_model(small_hf):
    return Transformer.from_pretrained(small_hf[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama3):
    return tiny_llama3


@pytest.fixture(scope="module")
def llm(checkpoint):
    return Llama.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32)


def prompt_of(n: int) -> list[int]:
    return [BOS] + [HELLO] * (n - 1)


# --- 1. checkpoint files whose contents are wrong ------------------------------------------------


def test_the_undamaged_copies_load(hf_copy, meta_copy, tokenizer_dir):
    """The damaged files below are copies of these: each error comes from the damage, not the setup."""
    Transformer.from_pretrained(hf_copy, device="cpu", dtype=torch.float32)
    Transformer.from_pretrained(meta_copy, device="cpu", dtype=torch.float32)
    assert Tokenizer.from_pretrained(tokenizer_dir).encode("Hello") == [HELLO]


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def safetensors_bytes(header, body: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def with_entry(change):
    """A file like the real one whose first tensor's header entry is changed by `change(entry)`."""

    def damage(data: bytes) -> bytes:
        header, body = safetensors_parts(data)
        change(header["model.embed_tokens.weight"])
        return safetensors_bytes(header, body)

    return damage


def last_tensor_past_the_end(data: bytes) -> bytes:
    header, body = safetensors_parts(data)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4]  # 4 bytes more than the file holds
    return safetensors_bytes(header, body)


def dict_without(key):
    return lambda entry: entry.pop(key)


def dict_with(key, value):
    return lambda entry: entry.update({key: value})


# (the new bytes of model.safetensors from the real ones, a pattern the message must also match: the tensor)
BAD_SAFETENSORS = {
    # "This is " read as the header length is 2.3e18 bytes: this used to be a MemoryError
    "text file": (lambda data: b"This is not a safetensors file, it only has the name of one.\n" * 40, None),
    "empty": (lambda data: b"", None),
    "7 bytes": (lambda data: data[:7], None),
    "header length 0": (lambda data: struct.pack("<Q", 0) + data[8:], None),
    "header length one past the file": (lambda data: struct.pack("<Q", len(data) - 7) + data[8:], None),
    "header length 2**63": (lambda data: struct.pack("<Q", 2**63) + data[8:], None),
    "header not JSON": (lambda data: safetensors_bytes(b"{not json at all}", safetensors_parts(data)[1]), None),
    "header not UTF-8": (lambda data: safetensors_bytes(b'{"\xff\xfe": 1}', safetensors_parts(data)[1]), None),
    "header a JSON list": (lambda data: safetensors_bytes([{"dtype": "F32"}], safetensors_parts(data)[1]), None),
    "header a JSON string": (lambda data: safetensors_bytes("tensors", safetensors_parts(data)[1]), None),
    "entry not an object": (
        lambda data: safetensors_bytes({"model.embed_tokens.weight": [0, 4]}, safetensors_parts(data)[1]),
        "model.embed_tokens.weight",
    ),
    "missing shape": (with_entry(dict_without("shape")), "model.embed_tokens.weight"),
    "negative shape": (with_entry(dict_with("shape", [-512, 64])), "model.embed_tokens.weight"),
    "shape a string": (with_entry(dict_with("shape", "512x64")), "model.embed_tokens.weight"),
    "missing dtype": (with_entry(dict_without("dtype")), "model.embed_tokens.weight"),
    "missing data_offsets": (with_entry(dict_without("data_offsets")), "model.embed_tokens.weight"),
    "data_offsets reversed": (with_entry(lambda e: e["data_offsets"].reverse()), "model.embed_tokens.weight"),
    "data_offsets negative": (with_entry(dict_with("data_offsets", [-4, 0])), "model.embed_tokens.weight"),
    "data_offsets one number": (with_entry(dict_with("data_offsets", [0])), "model.embed_tokens.weight"),
    "data_offsets strings": (with_entry(dict_with("data_offsets", ["0", "4"])), "model.embed_tokens.weight"),
    "data_offsets past the end of the file": (last_tensor_past_the_end, r"tensor \S+ is truncated"),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_damaged_safetensors_is_a_checkpoint_error_naming_the_file(hf_copy, case):
    damage, pattern = BAD_SAFETENSORS[case]
    f = hf_copy / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        Transformer.from_pretrained(hf_copy, device="cpu", dtype=torch.float32)
    assert "model.safetensors" in str(e.value)
    assert pattern is None or re.search(pattern, str(e.value))


# bytes that are not a JSON object, for every JSON file of a checkpoint
NOT_A_JSON_OBJECT = {
    "invalid JSON": b'{"model_type": "llama", ',
    "empty": b"",
    "a JSON list": b'[{"model_type": "llama"}]',
    "an empty JSON list": b"[]",
    "JSON null": b"null",
    "binary bytes": bytes(range(256)),
    "UTF-16 text": json.dumps({"model_type": "llama"}).encode("utf-16"),
}


@pytest.mark.parametrize("case", list(NOT_A_JSON_OBJECT))
def test_config_json_that_is_not_an_object_is_a_config_error_naming_it(hf_copy, case):
    (hf_copy / "config.json").write_bytes(NOT_A_JSON_OBJECT[case])
    with pytest.raises(ConfigError, match="config.json"):
        Transformer.from_pretrained(hf_copy, device="cpu", dtype=torch.float32)


def edit_config(d, **changes) -> None:
    """Rewrites config.json with `changes` (a value of ... removes the key)."""
    config = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (d / "config.json").write_text(json.dumps(config))


LLAMA3_ROPE = {"rope_theta": 500000.0, "rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}

# config.json values out of range: (changes, text the message must contain)
BAD_CONFIG_VALUES = {
    "negative hidden_size": (dict(hidden_size=-64), "-64"),
    "zero hidden_size": (dict(hidden_size=0), "got 0"),
    "string hidden_size": (dict(hidden_size="64"), "'64'"),  # with the head_dim transformers 5 writes
    "fractional hidden_size": (dict(hidden_size=64.5), "64.5"),
    "negative num_hidden_layers": (dict(num_hidden_layers=-2), "-2"),
    "zero max_position_embeddings": (dict(max_position_embeddings=0), "got 0"),
    "llama3 rope_parameters without a factor (transformers 5)": (dict(rope_parameters=LLAMA3_ROPE), "factor"),
    "llama3 rope_scaling without a factor (transformers 4)": (
        dict(rope_parameters=..., rope_theta=500000.0, rope_scaling={"rope_type": "llama3"}),
        "factor",
    ),
    "llama3 rope factor 0": (dict(rope_parameters={**LLAMA3_ROPE, "factor": 0}), "factor"),
    "llama3 rope factor a string": (dict(rope_parameters={**LLAMA3_ROPE, "factor": "8"}), "factor"),
    # a config without `head_dim` (transformers 4.x writes none) used to reach hidden_size // heads unchecked
    "string hidden_size, no head_dim": (dict(hidden_size="64", head_dim=...), "hidden_size must be"),
    "zero num_attention_heads, no head_dim": (dict(num_attention_heads=0, head_dim=...), "num_attention_heads"),
    "zero head_dim": (dict(head_dim=0), "head_dim must be"),
    "string rope_theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": "5e5x"}), "rope_theta"),
    "rope_parameters a string": (dict(rope_parameters="llama3"), "rope_parameters"),
    "string low_freq_factor": (dict(rope_parameters={**LLAMA3_ROPE, "factor": 8, "low_freq_factor": "x"}), "low_freq"),
    "heads not a multiple of kv heads": (dict(num_key_value_heads=3), "n_kv_heads 3"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_VALUES))
def test_config_value_out_of_range_is_a_config_error_naming_file_and_key(hf_copy, case):
    changes, named = BAD_CONFIG_VALUES[case]
    edit_config(hf_copy, **changes)
    with pytest.raises(ConfigError) as e:
        Transformer.from_pretrained(hf_copy, device="cpu", dtype=torch.float32)
    assert named in str(e.value) and "config.json" in str(e.value)


BAD_INDEX = {
    **NOT_A_JSON_OBJECT,
    "no weight_map": b'{"metadata": {}}',
    "weight_map a list": b'{"weight_map": ["model.safetensors"]}',
    "weight_map a string": b'{"weight_map": "model.safetensors"}',
    "weight_map to numbers": b'{"weight_map": {"lm_head.weight": 1}}',
}


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_bad_safetensors_index_is_a_checkpoint_error_naming_it(hf_copy, case):
    (hf_copy / "model.safetensors.index.json").write_bytes(BAD_INDEX[case])
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        Transformer.from_pretrained(hf_copy, device="cpu", dtype=torch.float32)


# Meta's names for the HF ones. The q/k weights are not permuted: these tests load, they do not compare logits.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
META_PARAMS = {  # ffn: int(2 * 4 * 64 / 3) = 170 -> * 0.5 = 85 -> rounded up to a multiple of 32: 96
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": VOCAB,
    "multiple_of": 32,
    "ffn_dim_multiplier": 0.5,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


@pytest.fixture(scope="module")
def meta_dir(small_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("small-meta")
    state = {}
    for name, t in small_hf[1].state_dict().items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            name = f"layers.{layer}.{HF_TO_META[rest]}"
        else:
            name = HF_TO_META[name]
        state[name] = t.detach().clone()
    torch.save(state, d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(META_PARAMS))
    return d


@pytest.fixture
def meta_copy(meta_dir, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(meta_dir, d)
    return d


@pytest.mark.parametrize("case", list(NOT_A_JSON_OBJECT))
def test_params_json_that_is_not_an_object_is_a_checkpoint_error_naming_it(meta_copy, case):
    (meta_copy / "params.json").write_bytes(NOT_A_JSON_OBJECT[case])
    with pytest.raises(CheckpointError, match="params.json"):
        Transformer.from_pretrained(meta_copy, device="cpu", dtype=torch.float32)


BAD_PARAMS_VALUES = {
    "string dim": (dict(dim="64"), "dim must be"),
    "zero n_heads": (dict(n_heads=0), "n_heads must be"),
    "zero multiple_of": (dict(multiple_of=0), "multiple_of must be"),
    "string vocab_size": (dict(vocab_size="x"), "vocab_size must be"),
    "null vocab_size": (dict(vocab_size=None), "vocab_size must be"),
    "string ffn_dim_multiplier": (dict(ffn_dim_multiplier="x"), "ffn_dim_multiplier must be"),
    "negative norm_eps": (dict(norm_eps=-1e-5), "norm_eps must be"),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS_VALUES))
def test_params_json_value_out_of_range_is_a_config_error_naming_file_and_key(meta_copy, case):
    changes, named = BAD_PARAMS_VALUES[case]
    (meta_copy / "params.json").write_text(json.dumps({**META_PARAMS, **changes}))
    with pytest.raises(ConfigError) as e:
        Transformer.from_pretrained(meta_copy, device="cpu", dtype=torch.float32)
    assert named in str(e.value) and "params.json" in str(e.value)


def torch_saved(obj):
    def damage(path, data: bytes) -> bytes:
        torch.save(obj, path)
        return path.read_bytes()

    return damage


# consolidated.00.pth contents: (the new bytes from the path and the real bytes, what the message must say)
BAD_META_SHARDS = {
    "text file": (lambda path, data: b"not a checkpoint\n" * 100, "not a PyTorch checkpoint"),
    "empty": (lambda path, data: b"", "not a PyTorch checkpoint"),
    "a pickle, not a zip": (lambda path, data: b"\x80\x02}q\x00." + data[:100], "not a PyTorch checkpoint"),
    "truncated to half": (lambda path, data: data[: len(data) // 2], "truncated or corrupt"),
    "truncated to 100 bytes": (lambda path, data: data[:100], "truncated or corrupt"),
    "last 64 bytes cut": (lambda path, data: data[:-64], "truncated or corrupt"),
    "torch.save of a list": (torch_saved([torch.zeros(2), torch.ones(2)]), "got list"),
    "torch.save of a tensor": (torch_saved(torch.zeros(2)), "got Tensor"),
    "torch.save of a dict of ints": (torch_saved({"tok_embeddings.weight": 3}), "dict of tensors"),
}


@pytest.mark.parametrize("case", list(BAD_META_SHARDS))
def test_damaged_meta_shard_is_a_checkpoint_error_naming_it(meta_copy, case):
    damage, says = BAD_META_SHARDS[case]
    f = meta_copy / "consolidated.00.pth"
    f.write_bytes(damage(f, f.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        Transformer.from_pretrained(meta_copy, device="cpu", dtype=torch.float32)
    assert "consolidated.00.pth" in str(e.value) and says in str(e.value)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, llama3_tokenizer_path):
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "original").mkdir()
    shutil.copy(llama3_tokenizer_path, d / "original" / "tokenizer.model")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    return d


@pytest.fixture
def tokenizer_dir(tokenizer_files, tmp_path):
    d = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_files, d)
    return d


@pytest.mark.parametrize("case", list(NOT_A_JSON_OBJECT))
@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json"])
def test_tokenizer_json_that_is_not_an_object_is_a_tokenizer_error_naming_it(tokenizer_dir, file, case):
    (tokenizer_dir / file).write_bytes(NOT_A_JSON_OBJECT[case])
    with pytest.raises(TokenizerError, match=file):
        Tokenizer.from_pretrained(tokenizer_dir)


def test_file_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(TokenizerError, ValueError)


# --- 2. device strings ---------------------------------------------------------------------------

BAD_DEVICES = ["gpu", "", "cuda:-1", "cuda:x", "tpu", "meta"]
if torch.cuda.is_available():  # an index past the last GPU
    BAD_DEVICES += ["cuda:99", f"cuda:{torch.cuda.device_count()}"]
else:  # no CUDA at all: every CUDA device string is refused
    BAD_DEVICES += ["cuda", "cuda:0", "cuda:7"]
if not torch.backends.mps.is_available():
    BAD_DEVICES += ["mps"]
GOOD_DEVICES = ["cpu", "cpu:0"] + (["cuda", "cuda:0"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_unusable_device_is_a_value_error_naming_it(small_hf, device):
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(small_hf[0], device=device, dtype=torch.float32)
    assert repr(device) in str(e.value)


@pytest.mark.parametrize("device", GOOD_DEVICES)
def test_usable_device_loads(small_hf, device):
    model = Transformer.from_pretrained(small_hf[0], device=device, dtype=torch.float32)
    assert model.tok_embeddings.weight.device.type == torch.device(device).type


# --- 3. non-finite and out-of-range generation settings ------------------------------------------

nan, inf = float("nan"), float("inf")
BAD_SAMPLING = [
    ("temperature", nan),
    ("temperature", inf),
    ("temperature", -inf),
    ("temperature", -0.1),
    ("temperature", "1"),
    ("temperature", True),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.0001),
    ("top_p", nan),
    ("top_p", -0.5),
    ("top_p", True),
    ("top_k", 0),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_k", "5"),
]
BAD_GENERATE_ONLY = [
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", True),
    ("max_new_tokens", -1),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", True),
    ("max_new_tokens", "4"),
]


def case_id(case) -> str:
    name, value = case
    return f"{name}={value!r}"


@pytest.mark.parametrize("case", BAD_SAMPLING, ids=case_id)
def test_sampling_params_refuse_bad_values_naming_them(case):
    name, value = case
    with pytest.raises(ValueError) as e:
        llama3.SamplingParams(**{name: value})
    assert name in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("case", BAD_SAMPLING + BAD_GENERATE_ONLY, ids=case_id)
def test_generate_refuses_bad_values_naming_them(llm, case):
    name, value = case
    kwargs = {"max_new_tokens": 2, "temperature": 0, name: value}
    with pytest.raises(ValueError) as e:
        llm.generate([prompt_of(3)], **kwargs)
    assert name in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("case", [("temperature", -0.1), ("top_p", nan), ("top_k", 0), ("seed", -1)], ids=case_id)
def test_param_error_carries_the_parameter(llm, case):
    """The CLI reports a ParamError by its `param` (as the flag of that name)."""
    from llama3.checks import ParamError

    name, value = case
    with pytest.raises(ParamError) as e:
        llm.generate([prompt_of(3)], 2, **{name: value})
    assert e.value.param == name


def test_sampling_params_accept_the_boundaries():
    p = llama3.SamplingParams(temperature=0, top_p=1.0, top_k=1)
    assert (p.temperature, p.top_p, p.top_k) == (0, 1.0, 1)
    assert llama3.SamplingParams(temperature=0.0, top_p=1e-9, top_k=None).top_p == 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0),
        dict(temperature=1.0, top_k=1),  # only the most likely token is left
        dict(temperature=1.0, top_p=1e-9, seed=5),  # only the token with no mass before it is left
    ],
    ids=str,
)
def test_boundary_settings_that_mean_greedy_give_transformers_greedy(llm, checkpoint, kwargs):
    prompt = llm.tokenizer.encode("Hello world, this is", bos=True)
    assert llm.generate([prompt], 6, stop_tokens=[], **kwargs) == [hf_greedy(checkpoint[1], prompt, 6)]


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_seed_boundaries_are_accepted_and_reproduce(llm, seed):
    prompt = prompt_of(4)
    a = llm.generate([prompt], 3, temperature=1.0, top_p=1.0, stop_tokens=[], seed=seed)
    b = llm.generate([prompt], 3, temperature=1.0, top_p=1.0, stop_tokens=[], seed=seed)
    assert a == b and len(a[0]) == 3 and all(0 <= t < 128256 for t in a[0])


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_zero_new_tokens_is_accepted(llm, n_prompts):
    assert llm.generate([prompt_of(3)] * n_prompts, 0) == [[]] * n_prompts
    assert llm.text_completion(["Hi"] * n_prompts, max_new_tokens=0) == [""] * n_prompts


# --- 4. wrong but iterable types ------------------------------------------------------------------

DIALOG = [{"role": "user", "content": "hi"}]
# (method, positional arguments, keyword arguments, exception, pattern the message must match)
WRONG_TYPES = {
    "text_completion of a string": ("text_completion", ("a string",), {}, TypeError, "list of prompt strings"),
    "text_completion of bytes": ("text_completion", (b"a string",), {}, TypeError, "list of prompt strings"),
    "text_completion of ids": ("text_completion", ([1, 2],), {}, TypeError, "list of prompt strings"),
    "text_completion of a mixed list": ("text_completion", (["ok", 3],), {}, TypeError, "list of prompt strings"),
    "chat_completion of one dialog": ("chat_completion", (DIALOG,), {}, TypeError, "list of dialogs"),
    "chat_completion of one message": ("chat_completion", (DIALOG[0],), {}, TypeError, "list of dialogs"),
    "chat_completion of a string": ("chat_completion", ("hi",), {}, TypeError, "list of dialogs"),
    "generate of a string": ("generate", ("abc",), {}, TypeError, "list of token-id lists"),
    "generate of one flat prompt": ("generate", ([BOS, HELLO],), {}, TypeError, "prompt 0 must be a list"),
    "generate of a string row": ("generate", ([[BOS], "ab"],), {}, TypeError, "prompt 1 must be a list"),
    "generate of float ids": ("generate", ([[1.0, 2.0]],), {}, ValueError, r"prompt 0 .*token ids.*1\.0"),
    "generate of bool ids": ("generate", ([[True]],), {}, ValueError, "prompt 0 .*token ids.*True"),
    "generate of an id past the vocabulary": ("generate", ([[128256]],), {}, ValueError, "prompt 0 .*128256"),
    "stop_tokens a string": ("generate", ([[BOS]],), dict(stop_tokens="x"), TypeError, "stop_tokens must be a list"),
    "stop_tokens an int": ("generate", ([[BOS]],), dict(stop_tokens=128009), TypeError, "stop_tokens must be a list"),
    "stop_tokens negative": ("generate", ([[BOS]],), dict(stop_tokens=[-1]), ValueError, r"stop_tokens.*-1"),
    "stop_tokens float": ("generate", ([[BOS]],), dict(stop_tokens=[1.0]), ValueError, r"stop_tokens.*1\.0"),
    "stop empty": ("text_completion", (["Hi"],), dict(stop=""), ValueError, "stop must be a non-empty string"),
    "stop [empty]": ("text_completion", (["Hi"],), dict(stop=[""]), ValueError, "stop must be a non-empty string"),
    "stop [ok, empty]": ("chat_completion", ([DIALOG],), dict(stop=["ok", ""]), ValueError, "non-empty string"),
    "stop [int]": ("chat_completion", ([DIALOG],), dict(stop=[7]), ValueError, "stop must be a non-empty string"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_input_type_says_what_is_expected(llm, case):
    method, args, kwargs, exc, pattern = WRONG_TYPES[case]
    with pytest.raises(exc, match=pattern):
        getattr(llm, method)(*args, max_new_tokens=2, temperature=0, **kwargs)


@pytest.mark.parametrize(
    "ids, pattern",
    [("abc", "list of token ids, got str"), (5, "got int"), ([1.5], "integer token ids"), ([None], "integer")]
    + [([True], "integer token ids"), ([9906, "x"], "integer token ids")],
)
def test_decode_of_something_other_than_ids_says_so(llm, ids, pattern):
    with pytest.raises(TypeError, match=pattern):
        llm.tokenizer.decode(ids)


def test_decode_takes_ids_as_list_tuple_tensor_or_array(llm):
    import numpy as np

    for ids in ([9906, 1917], (9906, 1917), torch.tensor([9906, 1917]), np.array([9906, 1917])):
        assert llm.tokenizer.decode(ids) == "Hello world"  # Meta's ids for "Hello world" (docs/llama3-facts.md)


# --- 5. token tensors the model cannot embed -----------------------------------------------------

# (tokens, exception, pattern the message must match)
BAD_TOKENS = {
    "id == vocab_size": (torch.tensor([[0, VOCAB, 1]]), ValueError, rf"token id {VOCAB} at \[0, 1\]"),
    "id far past the vocabulary": (torch.tensor([[1, 2], [3, 10**6]]), ValueError, r"token id 1000000 at \[1, 1\]"),
    "negative id": (torch.tensor([[5, 6, -1]]), ValueError, r"token id -1 at \[0, 2\]"),
    "float tensor": (torch.tensor([[1.0, 2.0]]), TypeError, "integer tensor.*float32"),
    "bool tensor": (torch.tensor([[True, False]]), TypeError, "integer tensor.*bool"),
    "1-D tensor": (torch.tensor([1, 2, 3]), TypeError, r"shape \(batch, seq_len\).*\(3,\)"),
    "3-D tensor": (torch.zeros(1, 2, 3, dtype=torch.long), TypeError, r"shape \(batch, seq_len\).*\(1, 2, 3\)"),
    "Python list": ([[1, 2, 3]], TypeError, "integer tensor.*got list"),
    "empty (1, 0)": (torch.zeros(1, 0, dtype=torch.long), ValueError, r"empty.*\(1, 0\)"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_are_named_by_the_forward(small_model, case):
    tokens, exc, pattern = BAD_TOKENS[case]
    with pytest.raises(exc, match=pattern):
        small_model(tokens)


@pytest.mark.parametrize(
    "tokens",
    [[[0, VOCAB - 1]], [[VOCAB - 1, 0, VOCAB - 1, 7]], [[0, 0, 0], [VOCAB - 1, VOCAB - 1, VOCAB - 1]]],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_the_vocabulary_boundaries_give_transformers_logits(small_model, small_hf, tokens, dtype):
    tokens = torch.tensor(tokens)
    with torch.no_grad():
        ours, theirs = small_model(tokens.to(dtype)), small_hf[1](tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# --- 6. prompts longer than the context ----------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, new",
    [([CONTEXT], 1), ([CONTEXT - 1], 2), ([CONTEXT + 1], 0), ([1], CONTEXT), ([CONTEXT - 6, 10], 7)],
    ids=str,
)
def test_one_token_past_the_context_is_refused(llm, lengths, new):
    with pytest.raises(ValueError, match=rf"= {CONTEXT + 1} exceeds the model context length of {CONTEXT}"):
        llm.generate([prompt_of(n) for n in lengths], new, temperature=0, stop_tokens=[])


@pytest.mark.parametrize(
    "lengths, new", [([CONTEXT], 0), ([CONTEXT - 1], 1), ([CONTEXT - 6, 10], 6), ([CONTEXT - 8], 8)], ids=str
)
def test_exactly_the_context_is_accepted(llm, lengths, new):
    out = llm.generate([prompt_of(n) for n in lengths], new, temperature=0, stop_tokens=[])
    assert [len(row) for row in out] == [new] * len(lengths)


@pytest.fixture(scope="module")
def own_model(checkpoint):
    """A model of its own for a Llama with a fixed cache, which would resize the shared one's."""
    return Transformer.from_pretrained(checkpoint[0], device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("max_seq_len", [CONTEXT + 1, 10**6, 0, -3, 2.5, True, "64"], ids=repr)
def test_max_seq_len_that_is_not_a_length_within_the_context_is_refused(llm, max_seq_len):
    with pytest.raises(ValueError, match="max_seq_len") as e:
        Llama(llm.model, llm.tokenizer, max_seq_len=max_seq_len)
    assert repr(max_seq_len) in str(e.value)


def test_max_seq_len_beyond_the_context_is_a_param_error_the_cli_names(llm):
    """The CLI names a ParamError by the flag of its `param` (`--max-seq-len/-c`), never the Python name."""
    from llama3.checks import ParamError
    from llama3.cli.common import PARAM_FLAGS

    with pytest.raises(ParamError) as e:
        Llama(llm.model, llm.tokenizer, max_seq_len=CONTEXT + 1)
    assert e.value.param == "max_seq_len" and PARAM_FLAGS[e.value.param] == "--max-seq-len/-c"
    assert str(CONTEXT) in e.value.problem and "max_seq_len" not in e.value.problem


@pytest.mark.parametrize("max_batch_size", [0, -1, 1.5], ids=repr)
def test_max_batch_size_below_one_is_refused(llm, max_batch_size):
    with pytest.raises(ValueError, match="max_batch_size") as e:
        Llama(llm.model, llm.tokenizer, max_batch_size=max_batch_size)
    assert repr(max_batch_size) in str(e.value)


@pytest.mark.parametrize("max_seq_len", [1, 64, CONTEXT])
def test_max_seq_len_is_the_context_of_generate(own_model, llm, max_seq_len):
    capped = Llama(own_model, llm.tokenizer, max_seq_len=max_seq_len)
    assert capped.context_length == max_seq_len
    n = max(max_seq_len - 4, 1)
    over = max_seq_len - n + 1
    with pytest.raises(ValueError, match=rf"= {max_seq_len + 1} exceeds the cache length of {max_seq_len}"):
        capped.generate([prompt_of(n)], over, temperature=0, stop_tokens=[])
    assert [len(r) for r in capped.generate([prompt_of(n)], over - 1, temperature=0, stop_tokens=[])] == [over - 1]
