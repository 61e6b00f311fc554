from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def cmd_quantize(args: argparse.Namespace) -> int:
    from llama3.weights.save import save_quantized

    t0 = time.perf_counter()
    out = save_quantized(args.model, args.output, args.mode, args.group_size, not args.quiet, args.keep_output)
    if not args.quiet:
        size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e6
        print(f"llama3: wrote {out} ({args.mode}, {size:.0f} MB) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
