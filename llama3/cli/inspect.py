"""`llama3 inspect PROMPT`: pictures of one forward pass, drawn with matplotlib (the `plot` extra).

`--attention LAYER[.HEAD]` draws the attention probabilities of a layer (every head, or one), the prompt's tokens
on both axes; `--logit-lens` the top token of each layer's residual stream through the final norm and the output
projection, at each position (`llama3.model.hooks.logit_lens`), coloured by its probability.
"""

from __future__ import annotations

import argparse
import math
import re
from importlib.util import find_spec

from llama3.cli.common import _add_load_args, _add_threads_arg, load


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="draw a layer's attention (--attention) or the logit lens (--logit-lens) of PROMPT as a PNG"
    )
    p.add_argument("prompt", help="the text to run through the model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--attention",
        metavar="LAYER[.HEAD]",
        help="the attention probabilities of layer LAYER (counted from 0): every head, or head HEAD",
    )
    what.add_argument(
        "--logit-lens", action="store_true", help="the top token after each layer at each position, and its probability"
    )
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the picture to write (.png, .svg or .pdf)")
    p.add_argument("--no-bos", action="store_true", help="do not begin the prompt with the begin-of-text token")
    _add_load_args(p)
    _add_threads_arg(p)
    p.set_defaults(parser=p, max_seq_len=None)


def check_inspect_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.attention is not None and not re.fullmatch(r"\d+(\.\d+)?", args.attention):
        parser.error(f"argument --attention: expected LAYER or LAYER.HEAD (e.g. 3 or 3.1), got {args.attention!r}")
    if not args.prompt.strip():
        parser.error("argument PROMPT: is empty: nothing to look at")


def token_label(text: str) -> str:
    """A token's text as a tick label: spaces as '·', newlines and tabs escaped, long ones cut."""
    text = text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= 14 else text[:13] + "…"


def cmd_inspect(args: argparse.Namespace) -> int:
    if find_spec("matplotlib") is None:
        raise ValueError("llama3 inspect draws with matplotlib, which is not installed (pip install 'llama3[plot]')")
    layer = head = None
    if args.attention is not None:
        layer, _, h = args.attention.partition(".")
        layer, head = int(layer), int(h) if h else None
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import torch

    llm, log, _ = load(args)
    model = llm.model
    n_layers, n_heads = model.args.n_layers, model.args.n_heads
    if layer is not None and layer >= n_layers:
        raise ValueError(f"--attention {args.attention}: the model has layers 0 to {n_layers - 1}")
    if head is not None and head >= n_heads:
        raise ValueError(f"--attention {args.attention}: the model has heads 0 to {n_heads - 1} in each layer")
    ids = llm.tokenizer.encode(args.prompt, bos=not args.no_bos)
    if len(ids) > llm.context_length:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's context holds {llm.context_length}")
    labels = [token_label(llm.tokenizer.decode([t])) for t in ids]
    tokens = torch.tensor([ids], device=llm.device)
    with torch.inference_mode():
        if layer is not None:
            _, cache = model.run_with_cache(tokens, [f"blocks.{layer}.attn.hook_pattern"])
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float().cpu()  # (H, T, T)
            heads = range(n_heads) if head is None else [head]
            draw_attention([pattern[h] for h in heads], [f"head {h}" for h in heads], labels, layer, args.out)
        else:
            from llama3.model.hooks import logit_lens

            probs = logit_lens(model, tokens)[:, 0].float().softmax(dim=-1)  # (L + 1, T, V)
            top_p, top = probs.max(dim=-1)
            text = [[token_label(llm.tokenizer.decode([t])) for t in row] for row in top.tolist()]
            draw_logit_lens(text, top_p.cpu(), labels, args.out)
    log(f"llama3: wrote {args.out}")
    return 0


def draw_attention(maps: list, titles: list[str], labels: list[str], layer: int, out: str) -> None:
    """Heatmaps (query token down, key token across) in a grid, token labels on the outer axes."""
    import matplotlib.pyplot as plt

    T, n = len(labels), len(maps)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = max(2.5, 0.28 * T + 1.2)  # inches per map: room for a label per token
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        image = ax.imshow(maps[i].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, {titles[i]}", fontsize=9)
        r, c = divmod(i, cols)
        ax.set_xticks(range(T), labels if r == rows - 1 or i + cols >= n else [], rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels if c == 0 else [], fontsize=7)
    fig.supxlabel("key token (attended to)", fontsize=9)
    fig.supylabel("query token", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_logit_lens(text: list[list[str]], probs, labels: list[str], out: str) -> None:
    """A (layers + 1) x positions grid: the top next-token guess written in each cell, coloured by its probability."""
    import matplotlib.pyplot as plt

    L1, T = probs.shape
    fig, ax = plt.subplots(figsize=(1.0 * T + 2.2, 0.3 * L1 + 1.6))
    image = ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for i in range(L1):
        for j in range(T):
            color = "white" if probs[i, j] > 0.6 else "black"
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6.5, color=color)
    ax.set_xticks(range(T), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L1), ["embed"] + [f"{i}" for i in range(L1 - 1)], fontsize=7)
    ax.set_xlabel("input token (the cell: the top guess for the token after it)", fontsize=9)
    ax.set_ylabel("after layer", fontsize=9)
    ax.set_title("logit lens: the top next token at each layer", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="its probability")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
