"""Supervised fine-tuning with LoRA / QLoRA: chat rows in, a PEFT adapter out (`llama3 finetune`).

    summary = finetune(TrainConfig(data="train.jsonl", output="out", max_steps=100))

Reading and encoding the rows (only assistant turns learned) and batching them by length is
`llama3.train.data`. The loss is the mean over every learned token of an optimizer step
(summed over its `grad_accum` micro-batches, divided by their token count), as transformers' Trainer does.
Everything random (adapter init, data order, dropout) follows `seed`; `resume` restores the adapters,
AdamW's moments, the schedule, the position in the data and the RNG, so a resumed run repeats the losses
of an uninterrupted one.

Outputs in `output`: adapter_model.safetensors + adapter_config.json (PEFT's format), train_log.jsonl (one
record per logging step: step, loss, lr, grad_norm, tokens_per_s; eval records: step, eval_loss),
checkpoint/ (the state `resume` reads), and with `merge`, merged/: a full checkpoint in the HF layout.
Each file is written under a temporary name and renamed when whole; `output` may not be, hold or lie inside
the model, nor name the data file among its outputs. A NaN or infinite loss or gradient norm stops training
at that step (`DivergedError`), before the optimizer spreads it into the adapters; the last checkpoint stays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from llama3.checks import ParamError
from llama3.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TARGET_MODULES,
    LoRAConfig,
    add_lora,
    lora_parameters,
    read_adapter,
    save_adapter,
    set_adapter_weights,
)
from llama3.train.data import (
    IGNORE,
    DataError,
    Example,
    collate,
    length_grouped_batches,
    prepare,
    read_chat_rows,
)
from llama3.train.merge import save_merged
from llama3.weights.hub import resolve
from llama3.weights.save import check_output, write_text

CHECKPOINT = "checkpoint"


MERGED = "merged"


TRAIN_LOG = "train_log.jsonl"


class DivergedError(RuntimeError):
    """Training met a NaN or infinite loss or gradient norm; the last checkpoint saved before it is kept."""


def token_loss_sum(model: torch.nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """The summed cross-entropy (float32) of the model's next-token predictions at every labelled position.

    Only those positions go through the output projection: most of a chat row is system and user turns and
    padding (80% of the positions of the benchmark's batches), and the (B, T, vocab) logits were a fifth of a
    training step's products on a 49,152-token vocabulary."""
    learned = targets != IGNORE
    h = model.hidden(inputs)[learned]  # (labelled positions, dim)
    logits = model.ops.linear(h, model.output)
    return F.cross_entropy(logits.float(), targets[learned], reduction="sum")


@dataclass
class TrainConfig:
    data: str
    output: str
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    eval_data: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    max_steps: int | None = None  # None: `epochs` passes over the data
    epochs: int = 1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    quantize: str | None = None  # "int8" / "int4": QLoRA over a quantized base
    group_size: int = 32
    device: str | None = None
    dtype: str | None = None
    logging_steps: int = 10
    eval_steps: int | None = None  # None: at every save and at the end
    save_steps: int | None = None  # None: only at the end
    resume: bool = False
    merge: bool = False
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True), repr=False)

    # the settings a resumed run must share with the run it continues (the others only change what is reported)
    TRAJECTORY = (
        "data", "model", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
        "learning_rate", "weight_decay", "batch_size", "grad_accum", "max_seq_len", "max_steps", "epochs",
        "warmup_steps", "max_grad_norm", "quantize", "group_size", "dtype", "seed",
    )  # fmt: skip

    def check(self) -> None:
        """Every setting in its range, before anything is read; a `ParamError` names the field (the CLI, its flag)."""
        positive = ("batch_size", "grad_accum", "max_seq_len", "epochs", "logging_steps")
        for name in positive + ("max_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParamError(name, f"must be an integer >= 1, got {value!r}")
        if self.max_seq_len < 2:
            raise ParamError("max_seq_len", f"must be >= 2 (a token and the one it predicts), got {self.max_seq_len}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ParamError("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        # finite, and below what any LoRA recipe uses by orders of magnitude: an infinite rate, weight decay or
        # alpha turns every adapter weight into NaN at the first step; a rate above 1 diverges as surely
        ranges = {
            "learning_rate": (0, 1, "a number in (0, 1]"),
            "weight_decay": (0, 1, "a number in [0, 1]"),
            "max_grad_norm": (0, math.inf, "a finite number > 0"),
            "lora_alpha": (0, math.inf, "a finite number > 0"),
        }
        for name, (low, high, what) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (ok and low <= value <= high and (value > 0 or name == "weight_decay")):
                raise ParamError(name, f"must be {what}, got {value!r}")
        self.lora_config()

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(
            r=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=tuple(self.target_modules),
            use_rslora=self.use_rslora,
            base_model=self.model,
        )

    def trajectory(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in self.TRAJECTORY}


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step `s` (0-based): linear from 1/W up to 1 over the W warmup steps, then
    half a cosine from 1 down to 0 at `total_steps`."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recomputes each block's activations in the backward pass instead of keeping them: memory for time.
    The block's own `forward` is wrapped on the instance, so module names (and adapter names) do not change;
    dropout masks are replayed (checkpoint restores the RNG state)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _written_by(output: Path, file: Path) -> bool:
    """Whether `file` is one that a run writing to `output` replaces (the data may sit beside the outputs)."""
    out, file = output.expanduser().resolve(), file.expanduser().resolve()
    names = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAIN_LOG)
    return file == out or file in {out / n for n in names} or any(out / d in file.parents for d in (CHECKPOINT, MERGED))


def load_for_training(config: TrainConfig, src: str | os.PathLike):
    """The model `src` with fresh adapters (seeded), its tokenizer and chat format."""
    from llama3.generate.llama import Llama

    llm = Llama.from_pretrained(
        src,
        device=config.device,
        dtype=config.dtype,
        backend="torch",
        quantize=config.quantize,
        group_size=config.group_size,
        progress=config.progress,
    )
    torch.manual_seed(config.seed)
    add_lora(llm.model, replace(config.lora_config(), base_model=str(src)))
    return llm, src


def finetune(config: TrainConfig) -> dict[str, Any]:
    """Trains LoRA adapters as `config` says and writes them (see the module docstring); returns a summary."""
    config.check()
    log = config.log
    output = Path(config.output)
    ckpt = output / CHECKPOINT
    src = config.model
    if src is None:
        from llama3.weights.hub import default_model

        src = default_model()
    check_output(output, resolve(src), "the model")
    for flag, data in (("--data", config.data), ("--eval-data", config.eval_data)):
        if data is None:
            continue
        if Path(data).is_dir():
            raise DataError(f"{data} is a directory; expected a data file of JSONL rows or .parquet ({flag})")
        if not Path(data).is_file():
            raise FileNotFoundError(f"data file not found: {data} ({flag})")
        if _written_by(output, Path(data)):
            raise ValueError(f"{flag} {data} would be overwritten by the output written to {output} (--output)")
    if config.resume and not (ckpt / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt}/trainer_state.pt not found (--resume)")
    if not config.resume and ckpt.exists():
        raise FileExistsError(
            f"{output} holds a checkpoint of an earlier run: pass --resume to continue it, or choose another --output"
        )
    train_dialogs = read_chat_rows(config.data)
    eval_dialogs = read_chat_rows(config.eval_data) if config.eval_data else None

    llm, src = load_for_training(config, src)
    model, device = llm.model, llm.device
    train = prepare(train_dialogs, llm.chat_format, config.max_seq_len, config.data, log)
    evals = prepare(eval_dialogs, llm.chat_format, config.max_seq_len, config.eval_data, log) if eval_dialogs else None
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = list(lora_parameters(model))
    n_batches = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or math.ceil(config.epochs * n_batches / config.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.warmup_steps, total))

    step, position = 0, 0  # optimizer steps done; micro-batches consumed (across epochs)
    trajectory = config.trajectory() | {"data": str(Path(config.data).resolve()), "data_sha256": _sha256(config.data)}
    if config.model is not None and Path(config.model).exists():  # a local path however it is written; else a repo id
        trajectory["model"] = str(Path(config.model).resolve())
    if config.resume:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        differ = [k for k in trajectory if state["trajectory"].get(k) != trajectory[k]]
        if differ:
            was = ", ".join(
                "other --data contents"
                if k == "data_sha256"
                else f"--{k.replace('_', '-')} {state['trajectory'].get(k)}"
                for k in differ
            )
            raise ValueError(f"cannot resume {ckpt}: it was trained with other settings or data ({was})")
        set_adapter_weights(model, read_adapter(ckpt)[1], str(ckpt))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, position = state["step"], state["position"]
        _set_rng_state(state["rng"])
        _truncate_log(output / TRAIN_LOG, step)
        log(f"llama3: resuming {ckpt} at step {step}")

    output.mkdir(parents=True, exist_ok=True)
    lengths = [len(e.ids) for e in train]
    epoch_batches: dict[int, list[list[int]]] = {}

    def micro_batch(k: int) -> list[Example]:
        epoch, i = divmod(k, n_batches)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = length_grouped_batches(lengths, config.batch_size, config.seed, epoch)
        return [train[j] for j in epoch_batches[epoch][i]]

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_trainable = sum(p.numel() for p in params)
    log(f"llama3: {len(train)} rows, {n_batches} batches an epoch, {total} steps; {n_trainable:,} trainable parameters")
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not config.progress)
    losses: list[float] = []
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "t0": time.perf_counter()}
    eval_loss = None
    model.train()
    with open(output / TRAIN_LOG, "a") as train_log:
        while step < total:
            group = [micro_batch(k) for k in range(position, position + config.grad_accum)]
            position += config.grad_accum
            n_targets = sum(e.n_targets for b in group for e in b)
            loss_sum = 0.0
            for batch in group:
                inputs, targets = collate(batch, device)
                with autocast:
                    loss = token_loss_sum(model, inputs, targets) / n_targets
                loss.backward()
                loss_sum += loss.item()
                window["tokens"] += sum(len(e.ids) for e in batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # before the step spreads it to the weights
                kept = (
                    f"the checkpoint of step {_saved_step(ckpt)} in {ckpt} is kept" if ckpt.is_dir() else "none saved"
                )
                raise DivergedError(
                    f"training stopped at step {step + 1}: loss {loss_sum}, gradient norm {grad_norm} (not finite; "
                    f"a lower --learning-rate or --max-grad-norm may help); {kept}"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_sum)
            window["loss"] += loss_sum * n_targets
            window["targets"] += n_targets
            if step % config.logging_steps == 0 or step == total:
                seconds = time.perf_counter() - window["t0"]
                record = {
                    "step": step,
                    "epoch": round(position / n_batches, 4),
                    "loss": window["loss"] / window["targets"],
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window["tokens"] / max(seconds, 1e-9),
                }
                train_log.write(json.dumps(record) + "\n")
                train_log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "t0": time.perf_counter()}
            bar.update(1)
            saving = config.save_steps is not None and step % config.save_steps == 0
            evaluating = evals is not None and (
                step == total or (step % config.eval_steps == 0 if config.eval_steps else saving)
            )
            if evaluating:
                eval_loss = evaluate(model, evals, config.batch_size, device)
                train_log.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                train_log.flush()
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
            if saving or step == total:
                _save_checkpoint(model, optimizer, scheduler, step, position, trajectory, ckpt)
    bar.close()
    model.eval()
    save_adapter(model, output)
    log(f"llama3: wrote the adapter to {output}")
    summary = {"steps": step, "losses": losses, "eval_loss": eval_loss, "output": str(output), "source": str(src)}
    if config.merge:
        summary["merged"] = str(save_merged(src, model, output / MERGED, progress=config.progress))
        log(f"llama3: wrote the merged checkpoint to {summary['merged']}")
    return summary


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, device: torch.device) -> float:
    """Mean loss per learned token over `examples` (batches in length order, no dropout)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    total, count = 0.0, 0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            inputs, targets = collate(batch, device)
            total += token_loss_sum(model, inputs, targets).item()
            count += sum(e.n_targets for e in batch)
    model.train(was_training)
    return total / count


def _saved_step(ckpt: Path) -> int | str:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
    except (OSError, RuntimeError, KeyError):
        return "?"


def _save_checkpoint(model, optimizer, scheduler, step: int, position: int, trajectory: dict, ckpt: Path) -> None:
    """The adapter and the trainer's state, written beside the old checkpoint and then swapped in."""
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    state = {
        "step": step,
        "position": position,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "trajectory": trajectory,
    }
    torch.save(state, tmp / "trainer_state.pt")
    old = ckpt.with_name(f".{ckpt.name}.old")  # the old one goes only once the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    """Drops the records of steps after `step` (written after the checkpoint a run resumes from)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in keep))


__all__ = [
    "DivergedError",
    "TrainConfig",
    "finetune",
]
