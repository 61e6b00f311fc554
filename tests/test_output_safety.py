"""No data lost, no silent nonsense: `llama3 quantize` never writes over the checkpoint it reads (the output
directory is, lies inside or contains the source, also through a symlink), an interrupted write leaves the
old file (never half a new one) under the final name, and a checkpoint holding NaN or infinity is refused by
tensor name at load and at quantization. Files are compared by their sha256 before and after.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from llama3.checks import CheckpointError
from llama3.model.transformer import Transformer
from llama3.weights.save import save_quantized

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree_hashes(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("where", ["same", "symlink", "inside", "parent"])
def test_quantize_refuses_an_output_that_is_inside_or_contains_the_source(tiny_hf, tmp_path, capsys, where):
    from llama3.cli import main

    d, _ = tiny_hf("llama3-gqa")
    (d / "tokenizer.json").write_text("{}")  # the source's side files are copied: none may be the same file
    (tmp_path / "link").symlink_to(d)
    output = {"same": d, "symlink": tmp_path / "link", "inside": d / "q", "parent": tmp_path}[where]
    before = tree_hashes(d)
    capsys.readouterr()
    code = main(["quantize", "--model", str(d), "--mode", "int4", "--output", str(output), "-q"])
    err = capsys.readouterr().err
    relation = {"same": "is", "symlink": "is", "inside": "lies inside", "parent": "contains"}[where]
    assert code == 1 and err.count("\n") == 1 and f"{relation} the source checkpoint" in err, err
    assert tree_hashes(d) == before and not (d / "q").exists()


def test_an_interrupted_quantize_leaves_the_earlier_output_whole(tiny_hf, tmp_path, monkeypatch):
    """Ctrl-C while model.safetensors is written: the earlier run's files stay as they were, no temp file stays."""
    import safetensors.torch

    d, _ = tiny_hf("llama3-gqa")
    out = save_quantized(d, tmp_path / "q", "int8", progress=False)
    before = tree_hashes(out)
    real = safetensors.torch.save_file

    def half_then_interrupt(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(d, out, "int4", progress=False)
    assert tree_hashes(out) == before  # no temporary file left beside them either
    Transformer.from_pretrained(out, device="cpu")  # still the int8 checkpoint, whole


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    from llama3.weights.save import atomic_write

    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(OSError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_a_checkpoint_holding_nan_or_inf_is_refused_by_tensor_name(tiny_hf, tmp_path, bad):
    d, hf = tiny_hf("llama3-gqa")
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[5, 7] = bad
    hf.save_pretrained(tmp_path / "bad")
    match = r"tensor model.layers.1.mlp.up_proj.weight holds NaN or infinite values"
    with pytest.raises(CheckpointError, match=match):
        Transformer.from_pretrained(tmp_path / "bad", device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=match):
        save_quantized(tmp_path / "bad", tmp_path / "q", "int8", progress=False)
    assert not (tmp_path / "q").exists()
