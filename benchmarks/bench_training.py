"""Measure the memory and time of the warm-up loss against one dense attention forward, fp32 on the CPU.

The warm-up stage trains the indexer with the KL from the head-mean attention distribution to the
indexer's distribution over every visible key. `warmup_kl_blockwise` computes it block by block, so no
[T, S] matrix is held. This benchmark runs, for each length T (T = S, causal) and one layer shape:

- dense: one `scaled_dot_product_attention` forward (the memory baseline: its growth is the output);
- warmup: `warmup_kl_blockwise` forward and backward, gradients into q_idx, k_idx and the head weights.

Each case runs in a fresh child process that reports its wall time and the growth of its resident-set
high-water mark (VmHWM) over the RSS just before the timed call. Before timing, the loss and its
gradients are compared with `warmup_kl_reference` at 300 tokens; a failed check exits with status 1.
The table gives the peak growth of both paths, their ratio, and the least-squares slope of the warm-up
peak against T (MiB per 1024 tokens). A PNG next to the JSON plots memory and time against T.

    python benchmarks/bench_training.py                       # T = 2k, 4k, 8k, 16k at SmolLM2 shapes
    python benchmarks/bench_training.py --shape qwen3-4b --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ops import (  # noqa: E402
    CHILD_ENVIRONMENT,
    SHAPES,
    collect_machine_info,
    current_rss_bytes,
    format_machine_info,
    make_inputs,
    peak_rss_bytes,
    reset_peak_rss,
)

from dsa.ops.indexer_loss import warmup_kl_blockwise, warmup_kl_reference  # noqa: E402

TOKENS: tuple[int, ...] = (2048, 4096, 8192, 16384)
PATHS: tuple[str, ...] = ("dense", "warmup")
MIB = 2**20


def run_case(shape: str, tokens: int, path: str, chunk_elements: int, seed: int) -> dict[str, Any]:
    """Time one call of `path` at T = S = tokens and measure its resident-set growth."""
    inputs = make_inputs(SHAPES[shape], tokens, tokens, torch.Generator().manual_seed(seed))
    q, k = inputs.q, inputs.k.transpose(1, 2)
    leaves = [t.requires_grad_() for t in (inputs.q_idx, inputs.k_idx, inputs.weights)]
    gc.collect()
    peak_is_isolated = reset_peak_rss()
    baseline = current_rss_bytes()
    started = time.perf_counter()
    if path == "dense":
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), inputs.k, inputs.v, is_causal=True, enable_gqa=True)
        del out
    else:
        loss = warmup_kl_blockwise(q, k, *leaves, chunk_elements=chunk_elements)
        loss.backward()
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {"seconds": seconds, "peak_growth_bytes": peak - baseline if peak_is_isolated else None}


def check_small(shape: str, chunk_elements: int, seed: int) -> float:
    """Compare the blockwise loss and its gradients with the reference at 300 tokens; return the max difference."""
    inputs = make_inputs(SHAPES[shape], 300, 300, torch.Generator().manual_seed(seed))
    q, k = inputs.q, inputs.k.transpose(1, 2)
    results = []
    # A small block budget makes the check cross several blocks.
    for fn, kwargs in ((warmup_kl_reference, {}), (warmup_kl_blockwise, {"chunk_elements": min(chunk_elements, 1 << 16)})):
        leaves = [t.detach().clone().requires_grad_() for t in (inputs.q_idx, inputs.k_idx, inputs.weights)]
        loss = fn(q, k, *leaves, **kwargs)
        loss.backward()
        results.append([loss.detach(), *[t.grad for t in leaves]])
    difference = max(float((a - b).abs().max()) for a, b in zip(*results))
    if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*results)):
        raise RuntimeError(f"warmup_kl_blockwise differs from warmup_kl_reference by {difference:.3g} at 300 tokens")
    return difference


def launch(shape: str, tokens: int, path: str, args: argparse.Namespace) -> dict[str, Any]:
    case = json.dumps({"shape": shape, "tokens": tokens, "path": path, "chunk_elements": args.chunk_elements, "seed": args.seed})
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case]
    completed = subprocess.run(command, env={**os.environ, **CHILD_ENVIRONMENT}, capture_output=True, text=True, timeout=args.case_timeout)
    if completed.returncode != 0:
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        return {"tokens": tokens, "path": path, "status": "failed", "message": f"exit status {completed.returncode}: {tail}"}
    return {"tokens": tokens, "path": path, "status": "ok", **json.loads(completed.stdout.strip().splitlines()[-1])}


def slope_mib_per_1k(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of peak MiB against tokens, per 1024 tokens."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] / 1024 for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Plot peak memory growth (MiB) and time (s) against T for both paths, as one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"dense": "dense attention forward (SDPA)", "warmup": "warm-up loss, forward and backward"}
    for case, marker in (("dense", "o"), ("warmup", "s")):
        rows = [r for r in results["cases"] if r["path"] == case and r["status"] == "ok"]
        tokens = [r["tokens"] for r in rows]
        axes[0].plot(tokens, [(r["peak_growth_bytes"] or 0) / MIB for r in rows], marker=marker, label=labels[case])
        axes[1].plot(tokens, [r["seconds"] for r in rows], marker=marker, label=labels[case])
    for axis, label in zip(axes, ("peak resident-set growth (MiB)", "wall time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens T = S")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    axes[1].set_yscale("log")
    settings = results["settings"]
    figure.suptitle(
        f"Warm-up loss against dense attention, {settings['shape']} layer, fp32 CPU, "
        f"block budget {settings['chunk_elements']} elements"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Peak memory (MiB) and time (s) of the warm-up loss against one dense attention forward, fp32 on the CPU.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="layer shape (default smollm2-135m)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="lengths T = S (tokens, default 2048 4096 8192 16384)")
    parser.add_argument(
        "--chunk_elements", type=int, default=1 << 22,
        help="block budget of the loss: queries x heads x keys per block (elements, default 4194304 = 16 MiB of fp32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--case_timeout", type=float, default=1800.0, help="limit of one case (seconds, default 1800)")
    parser.add_argument(
        "--output", type=Path,
        help="raw JSON output (default bench-results/training-SHAPE.json); a PNG plot is written next to it",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case is not None:
        spec = json.loads(args.case)
        print(json.dumps(run_case(**spec)))
        return 0
    if args.chunk_elements < 1 or any(t < 1 for t in args.tokens):
        parser.error("--chunk_elements and --tokens must be positive integers.")
    output = args.output or Path(f"bench-results/training-{args.shape}.json")
    results: dict[str, Any] = {
        "command": [Path(sys.executable).name, *sys.argv],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**vars(args), "output": str(output)},
        "machine": collect_machine_info(),
        "cases": [],
    }
    print(format_machine_info(results["machine"]))
    try:
        results["check_max_abs_difference"] = check_small(args.shape, args.chunk_elements, args.seed)
    except RuntimeError as error:
        print(f"error: correctness check failed, nothing is timed: {error}", file=sys.stderr)
        return 1
    print("check         warmup_kl_blockwise matches warmup_kl_reference at 300 tokens (loss and gradients)")
    for tokens in args.tokens:
        for path in PATHS:
            record = launch(args.shape, tokens, path, args)
            results["cases"].append(record)
            print(f"{path:<8}{tokens:>8}: {record.get('seconds', 0):.2f} s, peak growth "
                  f"{(record.get('peak_growth_bytes') or 0) / MIB:.1f} MiB {record['status']}", file=sys.stderr)

    def peak(tokens: int, path: str) -> float | None:
        for record in results["cases"]:
            if record["tokens"] == tokens and record["path"] == path and record["status"] == "ok" and record["peak_growth_bytes"] is not None:
                return record["peak_growth_bytes"] / MIB
        return None

    print(f"\n{'T':>8}{'dense MiB':>11}{'warm-up MiB':>13}{'warm-up/dense':>15}{'warm-up s':>11}")
    for tokens in args.tokens:
        dense, warm = peak(tokens, "dense"), peak(tokens, "warmup")
        seconds = next((r["seconds"] for r in results["cases"] if r["tokens"] == tokens and r["path"] == "warmup" and r["status"] == "ok"), None)
        ratio = f"{warm / dense:>15.2f}" if dense and warm is not None else f"{'n/a':>15}"
        print(f"{tokens:>8}{dense or 0:>11.1f}{warm or 0:>13.1f}{ratio}{seconds or 0:>11.2f}")
    points = [(t, peak(t, "warmup")) for t in args.tokens if peak(t, "warmup") is not None]
    results["warmup_slope_mib_per_1k_tokens"] = slope_mib_per_1k(points)
    dense_points = [(t, peak(t, "dense")) for t in args.tokens if peak(t, "dense") is not None]
    results["dense_slope_mib_per_1k_tokens"] = slope_mib_per_1k(dense_points)
    print(f"\nslope of the peak growth: warm-up {results['warmup_slope_mib_per_1k_tokens']} MiB, dense "
          f"{results['dense_slope_mib_per_1k_tokens']} MiB per 1024 tokens")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot = output.with_suffix(".png")
    write_plot(results, plot)
    print(f"raw results   {output}\nplot          {plot}")
    return 1 if any(r["status"] != "ok" for r in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
