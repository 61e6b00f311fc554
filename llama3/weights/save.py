from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llama3.checks import CheckpointError
from llama3.quant.weight_only import DEFAULT_GROUP_SIZE, is_quantized_layer, mode_for
from llama3.quant.weight_only import check_settings as check_quantize_settings
from llama3.weights.build import QUANT_METHOD, _fused_name, _quantize, gguf_file, open_checkpoint, stored_quantization
from llama3.weights.hub import resolve
from llama3.weights.safetensors import check_finite


def check_output(output: str | os.PathLike, source: str | os.PathLike, what: str = "the source checkpoint") -> None:
    """Refuses to write to `output` when it is `source`, lies inside it or contains it (symlinks resolved, so a
    hub cache snapshot or a link to the model directory counts as the directory itself): a run must never write
    over what it reads."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src:
        relation = "is"
    elif src in out.parents:
        relation = "lies inside"
    elif out in src.parents:
        relation = "contains"
    else:
        return
    raise ValueError(f"output directory {output} {relation} {what} {source}; choose another (--output)")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` (`.NAME.tmp-XXXX`, same directory, so same file system) to write to; renamed
    to `path` when the block ends without an error, removed when it raises (Ctrl-C too). An interrupted run leaves
    the old file, or none, under the final name, never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def copy_files(src: Path, output: Path, names: tuple[str, ...]) -> None:
    """Copies each of `names` that `src` holds (tokenizer and generation files) into `output`, atomically."""
    for name in names:
        if (src / name).is_file():
            with atomic_write(output / name) as tmp:
                shutil.copyfile(src / name, tmp)


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "tokenizer.model", "original/tokenizer.model")  # fmt: skip


def save_quantized(
    src: str | os.PathLike,
    output: str | os.PathLike,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = True,
    keep_output: bool = False,
) -> Path:
    """Writes `src` with int8/int4 projections to the directory `output`: model.safetensors, a config.json
    with `quantization_config`, and the source's tokenizer files. `from_pretrained(output)` then reads the
    codes as they are (no float copy of a projection, no re-quantization).

    One tensor of the source is read at a time and quantized at once: peak memory is about the quantized
    model plus one float tensor.
    """
    check_quantize_settings(mode, group_size, torch.device("cpu"), torch.bfloat16)
    path, output = resolve(src), Path(output)
    check_output(output, path)
    if gguf_file(path) is not None:
        raise CheckpointError(
            f"{path} is a GGUF file, quantized already: load it as it is (with int4, its 4-bit codes are used)"
        )
    if stored_quantization(path) is not None:
        raise CheckpointError(f"{path} is quantized already")
    args, tensors, count = open_checkpoint(path, progress)
    names = args.hf_shapes()
    out: dict[str, Tensor] = {}
    bar = tqdm(total=count, desc=f"quantizing {path.name} to {mode}", unit="tensor", disable=not progress)
    for name, t in tensors():
        bar.update(1)
        check_finite(t, name, str(path))
        ours = _fused_name(name)[0] if name in names else name
        layer_mode = is_quantized_layer(ours) and mode_for(ours, mode, keep_output)
        if layer_mode:
            q = _quantize(t, layer_mode, group_size, f"{path}: {name}")
            out |= {f"{name.removesuffix('.weight')}.{k}": v.contiguous() for k, v in q.stored().items()}
        else:
            out[name] = t.contiguous()
    bar.close()
    config = args.to_hf_config() | {
        "quantization_config": {
            "quant_method": QUANT_METHOD,
            "mode": mode,
            "group_size": group_size,
            "keep_output": keep_output,
        }
    }
    save_safetensors(out, output / "model.safetensors")
    write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    copy_files(path, output, SIDE_FILES)
    return output
