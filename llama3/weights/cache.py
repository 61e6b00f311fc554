"""A per-machine cache of a GGUF file's weights in the form the CPU kernels run them, so that a cold start
does not redo the conversions (`llama3 generate` on the embedded SmolLM2: its load went from 1.62 s to 0.29 s,
benchmarks/results/cold-start.md).

Loading a GGUF file into the quantized CPU kernels decodes its Q4 blocks, re-lays the codes for
`_weight_int4pack_mm_for_cpu`, dequantizes the Q8_0 embedding and requantizes it per row for the output
projection. The result depends only on the file, the load's settings, the CPU and the library, so it is kept:
one `torch.save` file per (GGUF file, settings) under `$LLAMA3_WEIGHT_CACHE`, by default
`$XDG_CACHE_HOME/llama3/weights` (`~/.cache/llama3/weights`), read back memory-mapped. It holds the packed
buffers of `Int4Linear` / `Int8Linear` / `DotLinear` and the int8 codes of a `DynInt8Linear` (fbgemm's packed
form is not serializable: it is prepacked again, in the background, `llama3.quant.dynamic`), and the float
tensors. Beside
it, the file's tokenizer as tiktoken takes it (`llama3.weights.gguf_tokenizer`), for files of any size.

An entry is used only if its key matches: the file's path, size and modification time, the settings, the CPU
model, instruction sets and ATen dispatch, the torch and Python versions, and the size and time of the library's
loading code. Anything else rebuilds the entry and replaces it (written to a temporary name and renamed, so a reader
never sees half a file). `LLAMA3_WEIGHT_CACHE=0` turns it off. GGUF files above 1 GiB are not cached: an entry
takes about 1.5x the file's size (the embedding is kept as float32; 152 MB for the embedded SmolLM2).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llama3.quant.dot import DotLinear
from llama3.quant.dynamic import DynInt8Linear
from llama3.quant.weight_only import Int4Linear, Int8Linear, QuantizedWeight

FORMAT = 1
MAX_SOURCE_BYTES = 2**30
_OFF = ("0", "off", "false", "no")
_PLAIN = (Int4Linear, Int8Linear, DotLinear)  # rebuilt from their attributes and buffers, with no packing
_ATTRS = (int, str, bool, float, type(None))


def cache_dir() -> Path | None:
    """Where entries live; None when `LLAMA3_WEIGHT_CACHE` turns the cache off."""
    setting = os.environ.get("LLAMA3_WEIGHT_CACHE")
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama3" / "weights"
    except (RuntimeError, KeyError):  # no home directory to find: no cache
        return None


def _code_fingerprint() -> str:
    """Size and time of every module that turns a file into a model: a changed loader is a changed entry."""
    root = Path(__file__).parent.parent  # the llama3 package
    stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
             for sub in ("weights", "quant", "model", "text") for p in sorted((root / sub).glob("*.py"))]  # fmt: skip
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def entry_for(
    source: Path, settings: dict[str, Any], suffix: str = ".pt", max_bytes: int | None = MAX_SOURCE_BYTES
) -> tuple[Path, dict[str, Any]] | None:
    """(the entry's file, its key) for loading `source` with `settings`; None if not cached (off, no such file, or
    larger than `max_bytes`)."""
    from llama3.quant.choice import machine_key

    directory = cache_dir()
    if directory is None or not source.is_file():
        return None
    stat = source.stat()
    if max_bytes is not None and stat.st_size > max_bytes:
        return None
    ident = {"source": str(source.resolve()), **settings}
    # one file per source and settings: a changed file, torch or CPU replaces its entry instead of adding one
    name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24] + suffix
    key = {**ident, "format": FORMAT, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "machine": machine_key(),
           "code": _code_fingerprint(), "python": sys.version}  # fmt: skip
    return directory / name, key


def read(path: Path, key: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, nn.Module]] | None:
    """The float tensors and the quantized modules of an entry whose key matches; None otherwise."""
    try:
        saved = torch.load(path, mmap=True, weights_only=True)
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        modules = {name: _module(spec) for name, spec in saved["modules"].items()}
        return saved["state"], modules
    except FileNotFoundError:
        return None
    except Exception:  # an unreadable entry (a disk error, a format from another version): rebuilt and replaced
        return None


def write(path: Path, key: dict[str, Any], model: nn.Module) -> bool:
    """Stores `model`'s weights under `key`; False (and nothing written) if a module is of a kind not cached."""
    modules, skip = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, DynInt8Linear):
            q = module.weight_codes()
            spec = {"kind": "DynInt8Linear", "codes": q.codes, "scales": q.scales, "reduce_range": module.reduce_range}
        elif isinstance(module, _PLAIN):
            attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
            if not all(isinstance(v, _ATTRS) for v in attrs.values()):
                return False
            buffers = dict(module.named_buffers(recurse=False))
            spec = {"kind": type(module).__name__, "attrs": attrs, "buffers": buffers}
        else:
            continue
        modules[name] = spec
        skip |= {f"{name}.{k}" for k in module.state_dict()}
    state = {k: v for k, v in model.state_dict().items() if k not in skip}  # a tied output shares its storage
    return _replace(path, lambda tmp: torch.save({"key": key, "state": state, "modules": modules}, tmp))


def read_tokenizer(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of `Tokenizer.from_encoding` stored under `key` (marshal: plain data, no code run)."""
    try:
        saved = marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return saved.get("encoding") if isinstance(saved, dict) and saved.get("key") == key else None


def write_tokenizer(path: Path, key: dict[str, Any], encoding: dict[str, Any]) -> bool:
    data = marshal.dumps({"key": key, "encoding": encoding})
    return _replace(path, lambda tmp: Path(tmp).write_bytes(data))


def _replace(path: Path, write_to) -> bool:
    """Writes through `write_to(a temporary name)` and renames it to `path`: a reader sees the old entry or the new."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            write_to(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:  # a read-only or full disk: load from the file again next time
        return False
    return True


def _module(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "DynInt8Linear":
        return DynInt8Linear(QuantizedWeight("int8", spec["codes"], spec["scales"]), spec["reduce_range"])
    cls = {c.__name__: c for c in _PLAIN}[spec["kind"]]
    module = cls.__new__(cls)  # its __init__ packs codes; these buffers are packed already
    nn.Module.__init__(module)
    for k, v in spec["attrs"].items():
        setattr(module, k, v)
    for k, v in spec["buffers"].items():
        module.register_buffer(k, v)
    return module
