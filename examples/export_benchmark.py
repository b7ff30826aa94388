"""Sizes and per-stage forward latency of exported graphs against the frameworks (CPU).

    python examples/export_benchmark.py --threads 1 --json runs/export-benchmark.json

prints Markdown tables (docs/export.md#figures holds the measured ones) and writes the
timings as JSON. Threads: every runtime gets the same number (torch intra-op, onnxruntime
intra-op, and the BLAS that Chainer's CPU convolutions use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--input-size", type=int, help="default: the recipes' (227)")
    parser.add_argument("--width", type=float, help="default: the recipes' (1.0)")
    parser.add_argument("--batch", type=int, action="append", help="default: 1 and 32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)  # before NumPy loads its BLAS

    from deeppose_cli.apps.export_benchmark import export_benchmark, markdown_tables
    from deeppose_cli.core.errors import DeepPoseError
    from deeppose_cli.core.files import write_json

    try:
        result = export_benchmark(args.input_size, args.width, args.batch or (1, 32),
                                  args.repeats, args.warmup, args.threads,
                                  log=lambda line: print(line, file=sys.stderr))
    except DeepPoseError as e:
        sys.exit(f"Error: {e}")
    result["command"] = " ".join(["python", *sys.argv])
    if args.json:
        write_json(args.json, result)
    print(markdown_tables(result))
    print(json.dumps(result["environment"], indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
