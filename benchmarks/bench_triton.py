"""Time the Triton kernels on a GPU against dense causal attention (SDPA, FlashAttention on recent GPUs).

For each layer shape and context length T it builds random bf16 inputs and causal index sets of
`--top_k` keys per query, then:

1. checks correctness before timing anything: the kernels' forward and backward at a small size
   against the PyTorch operator in fp32, and at every timed size the forward output of sampled
   queries. A failed check stops the run with exit status 1 and times nothing;
2. times sparse attention forward and forward + backward (`sparse_attention_triton`) against SDPA
   forward and forward + backward. It also times the split-K decode step for one query against a
   cache of T tokens, and the indexer score kernel for the last `--indexer_queries` queries against
   all T keys;
3. prints a markdown table (milliseconds, TFLOP/s, GB/s, dense / sparse time ratios) and writes raw
   JSON with the GPU model and versions.

FLOP counts: attention forward is 4 * pairs * H * D (two matmuls), backward 2.5 x the forward (five
matmuls), where pairs is the number of (query, key) products: T * (T + 1) / 2 for dense causal, and the
number of valid index slots for sparse. Sparse GB/s counts the gathered key and value rows (each
kv-head group reads its selected rows once), q, out and the indices.

    python benchmarks/bench_triton.py                      # 8k to 128k tokens, two shapes; minutes on an H200
    python benchmarks/bench_triton.py --tokens 8192 32768 --shapes qwen3-4b
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --smoke   # tiny sizes on the CPU (tests only)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dsa.ops._triton import require_triton  # noqa: E402

# name: (H query heads, HKV key/value heads, D head dim, HI indexer heads, DI indexer head dim)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "smollm2-135m": (9, 3, 64, 4, 64),
    "qwen3-4b": (32, 8, 128, 64, 128),
}
TOKENS: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
SMOKE_TOKENS: tuple[int, ...] = (48, 96)


class CorrectnessError(RuntimeError):
    """A kernel disagrees with the PyTorch operator; nothing is timed."""


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    return info


def causal_indices(tokens: int, top_k: int, device: torch.device, generator: torch.Generator, rows: int = 1024) -> torch.Tensor:
    """Random index sets [1, T, K]: query t keeps min(t + 1, K) distinct keys of 0..t, ascending, -1 after."""
    out = torch.empty(1, tokens, top_k, dtype=torch.int32, device=device)
    keys = torch.arange(tokens, device=device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        scores = torch.rand(stop - start, tokens, generator=generator, device=device)
        scores = scores.masked_fill(keys[None, :] > torch.arange(start, stop, device=device)[:, None], -1.0)
        values, chosen = scores.topk(min(top_k, tokens), dim=-1)
        chosen = chosen.masked_fill(values < 0, tokens).sort(dim=-1).values
        chosen = chosen.masked_fill(chosen == tokens, -1)
        out[0, start:stop, : chosen.shape[1]] = chosen.to(torch.int32)
        out[0, start:stop, chosen.shape[1] :] = -1
    return out


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` (CUDA: triton.testing.do_bench; CPU: a perf_counter loop)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(50, 20 * repeats)))
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0


def check(label: str, actual: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    error = max_error(actual, expected)
    scale = float(expected.float().abs().max()) if expected.numel() else 0.0
    if not math.isfinite(error) or error > atol * max(1.0, scale):
        raise CorrectnessError(f"{label}: max error {error:.3e} against the PyTorch operator exceeds {atol:.1e} x max(1, {scale:.2e})")
    return error


def check_small(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device, smoke: bool) -> dict[str, float]:
    """Forward, lse and every gradient of a small problem against `sparse_attention_torch` in fp32."""
    from dsa.ops.sparse_attention import sparse_attention_torch
    from dsa.ops.sparse_attention.triton import sparse_attention_triton

    heads, kv_heads, head_dim = shape[:3]
    tokens, top_k = (40, 16) if smoke else (1024, 256)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, tokens, heads, head_dim, generator=generator, device=device)
    k = torch.randn(1, tokens, kv_heads, head_dim, generator=generator, device=device)
    v = torch.randn(1, tokens, kv_heads, head_dim, generator=generator, device=device)
    grad = torch.randn(1, tokens, heads, head_dim, generator=generator, device=device)
    indices = causal_indices(tokens, top_k, device, generator)
    results = []
    for fn, cast in ((sparse_attention_torch, torch.float32), (sparse_attention_triton, dtype)):
        leaves = [t.detach().to(cast).clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, indices)
        out.backward(grad.to(cast))
        results.append([out.detach(), *[t.grad for t in leaves]])
    # bf16 inputs round q, k, v and the probabilities: a tolerance of a few bf16 ulps of the largest value.
    atol = 2e-5 if dtype == torch.float32 else 3e-2
    return {name: check(f"{name} ({dtype}, T={tokens})", got, want, atol) for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0])}


def run_case(name: str, tokens: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from dsa.ops.indexer.triton import index_scores_triton
    from dsa.ops.sparse_attention import sparse_attention_torch
    from dsa.ops.sparse_attention.triton import sparse_attention_decode_triton, sparse_attention_triton

    heads, kv_heads, head_dim, index_heads, index_dim = SHAPES[name]
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    q, k, v = randn(1, tokens, heads, head_dim), randn(1, tokens, kv_heads, head_dim), randn(1, tokens, kv_heads, head_dim)
    grad = randn(1, tokens, heads, head_dim)
    indices = causal_indices(tokens, args.top_k, device, generator)
    pairs = int((indices >= 0).sum())
    dense_pairs = tokens * (tokens + 1) // 2

    # Correctness at this size: sampled queries against the PyTorch operator in fp32.
    rows = torch.randperm(tokens, generator=torch.Generator().manual_seed(1))[: args.check_rows].sort().values.to(device)
    out = sparse_attention_triton(q, k, v, indices)
    expected = sparse_attention_torch(q[:, rows].float(), k.float(), v.float(), indices[:, rows])
    error = check(f"{name} T={tokens} forward rows", out[:, rows], expected, 2e-5 if dtype == torch.float32 else 3e-2)
    decode_indices = indices[:, -1:]
    decode_out = sparse_attention_decode_triton(q[:, -1:], k, v, decode_indices)
    check(f"{name} T={tokens} decode", decode_out, out[:, -1:], 2e-5 if dtype == torch.float32 else 3e-2)
    del out, expected

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_leaves = [t.transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
    dense_grad = grad.transpose(1, 2)

    def sparse_forward() -> Any:
        with torch.no_grad():
            return sparse_attention_triton(q, k, v, indices)

    def sparse_train() -> None:
        sparse_attention_triton(*leaves, indices).backward(grad)
        for leaf in leaves:
            leaf.grad = None

    def dense_forward() -> Any:
        with torch.no_grad():
            return F.scaled_dot_product_attention(*[t.detach() for t in dense_leaves], is_causal=True, enable_gqa=True)

    def dense_train() -> None:
        F.scaled_dot_product_attention(*dense_leaves, is_causal=True, enable_gqa=True).backward(dense_grad)
        for leaf in dense_leaves:
            leaf.grad = None

    def decode() -> Any:
        return sparse_attention_decode_triton(q[:, -1:], k, v, decode_indices)

    def dense_decode() -> Any:
        return F.scaled_dot_product_attention(
            q[:, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )

    index_queries = min(args.indexer_queries, tokens)
    q_idx = randn(1, index_queries, index_heads, index_dim)
    k_idx = randn(1, tokens, index_dim)
    weights = randn(1, index_queries, index_heads)

    def indexer() -> Any:
        return index_scores_triton(q_idx, k_idx, weights, q_start=tokens - index_queries)

    timings = {
        "sparse_fwd_ms": time_ms(sparse_forward, device, args.repeats),
        "sparse_fwd_bwd_ms": time_ms(sparse_train, device, args.repeats),
        "dense_fwd_ms": time_ms(dense_forward, device, args.repeats),
        "dense_fwd_bwd_ms": time_ms(dense_train, device, args.repeats),
        "sparse_decode_ms": time_ms(decode, device, args.repeats),
        "dense_decode_ms": time_ms(dense_decode, device, args.repeats),
        "indexer_ms": time_ms(indexer, device, args.repeats),
    }
    element = torch.finfo(dtype).bits // 8
    sparse_flop = 4 * pairs * heads * head_dim
    dense_flop = 4 * dense_pairs * heads * head_dim
    # Gathered K and V rows per kv-head group, plus q, out and the int32 indices.
    sparse_bytes = 2 * pairs * kv_heads * head_dim * element + 2 * tokens * heads * head_dim * element + indices.numel() * 4
    index_pairs = sum(min(tokens - index_queries + t + 1, tokens) for t in range(index_queries))
    record = {
        "shape": name,
        "tokens": tokens,
        "top_k": args.top_k,
        "dtype": args.dtype,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "indexer_heads": index_heads,
        "indexer_head_dim": index_dim,
        "indexer_queries": index_queries,
        "sparse_pairs": pairs,
        "check_max_error": error,
        **timings,
        "sparse_fwd_tflops": sparse_flop / timings["sparse_fwd_ms"] / 1e9,
        "sparse_fwd_bwd_tflops": 3.5 * sparse_flop / timings["sparse_fwd_bwd_ms"] / 1e9,
        "sparse_fwd_gbps": sparse_bytes / timings["sparse_fwd_ms"] / 1e6,
        "dense_fwd_tflops": dense_flop / timings["dense_fwd_ms"] / 1e9,
        "dense_fwd_bwd_tflops": 3.5 * dense_flop / timings["dense_fwd_bwd_ms"] / 1e9,
        "indexer_tflops": 2 * index_pairs * index_heads * index_dim / timings["indexer_ms"] / 1e9,
        "fwd_speedup": timings["dense_fwd_ms"] / timings["sparse_fwd_ms"],
        "fwd_bwd_speedup": timings["dense_fwd_bwd_ms"] / timings["sparse_fwd_bwd_ms"],
        "decode_speedup": timings["dense_decode_ms"] / timings["sparse_decode_ms"],
    }
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    header = (
        "| shape | T | sparse fwd ms | TFLOP/s | GB/s | dense fwd ms | fwd ratio | sparse fwd+bwd ms | TFLOP/s "
        "| dense fwd+bwd ms | fwd+bwd ratio | decode ms | dense decode ms | decode ratio | indexer ms | indexer TFLOP/s |"
    )
    lines = [header, "|" + " --- |" * 2 + " ---: |" * 14]
    for r in records:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['sparse_fwd_ms']:.3f} | {r['sparse_fwd_tflops']:.1f} | {r['sparse_fwd_gbps']:.0f} "
            f"| {r['dense_fwd_ms']:.3f} | {r['fwd_speedup']:.2f}x | {r['sparse_fwd_bwd_ms']:.3f} | {r['sparse_fwd_bwd_tflops']:.1f} "
            f"| {r['dense_fwd_bwd_ms']:.3f} | {r['fwd_bwd_speedup']:.2f}x | {r['sparse_decode_ms']:.4f} | {r['dense_decode_ms']:.4f} "
            f"| {r['decode_speedup']:.2f}x | {r['indexer_ms']:.3f} | {r['indexer_tflops']:.1f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Ratios are dense time / sparse time: above 1 means the sparse kernel is faster.",
    )
    parser.add_argument("--tokens", type=int, nargs="+", help=f"context lengths T in tokens (default: {' '.join(map(str, TOKENS))})")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES), help="layer shapes to run")
    parser.add_argument("--top_k", type=int, default=2048, help="keys selected per query (default: 2048)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="input dtype (default: bfloat16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement on the CPU; on a GPU do_bench decides (default: 5)")
    parser.add_argument("--check_rows", type=int, default=256, help="queries per size checked against PyTorch before timing (default: 256)")
    parser.add_argument(
        "--indexer_queries", type=int, default=4096, help="queries timed through the indexer kernel, the last ones of the context (default: 4096)"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/triton.json"), help="raw JSON output path")
    parser.add_argument("--markdown", type=Path, help="also write the table (with the machine line) to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (48 and 96 tokens, top_k 16) for a quick check, e.g. on the CPU interpreter")
    parser.add_argument("--force", action="store_true", help="overwrite --output and --markdown if they exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        require_triton(device)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.smoke:
        args.tokens = args.tokens or list(SMOKE_TOKENS)
        args.top_k = min(args.top_k, 16)
        args.check_rows = min(args.check_rows, 8)
        args.indexer_queries = min(args.indexer_queries, 16)
        args.repeats = min(args.repeats, 2)
    tokens = args.tokens or list(TOKENS)
    if args.top_k < 1 or any(t < 1 for t in tokens):
        print(f"error: --top_k {args.top_k} and --tokens {tokens} must be positive integers", file=sys.stderr)
        return 2
    for path in (args.output, args.markdown):
        if path is not None and path.exists() and not args.force:
            print(f"error: {path} exists; pass --force to overwrite it or choose another path", file=sys.stderr)
            return 2

    dtype = getattr(torch, args.dtype)
    results: dict[str, Any] = {"machine": machine_info(device), "args": {k: str(v) for k, v in vars(args).items()}, "checks": {}, "records": []}
    print(f"machine: {results['machine']}", flush=True)
    try:
        for name in args.shapes:
            results["checks"][name] = check_small(SHAPES[name], dtype, device, args.smoke)
            print(f"{name}: forward and backward match PyTorch ({results['checks'][name]})", flush=True)
        for name in args.shapes:
            for size in tokens:
                record = run_case(name, size, args, device)
                results["records"].append(record)
                print(f"{name} T={size}: sparse fwd {record['sparse_fwd_ms']:.3f} ms, dense fwd {record['dense_fwd_ms']:.3f} ms", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except CorrectnessError as error:
        print(f"correctness check failed, nothing timed: {error}", file=sys.stderr)
        return 1
    table = format_table(results["records"])
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        machine = results["machine"]
        args.markdown.write_text(
            f"Machine: {machine['device']}; torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}; "
            f"{args.dtype}, top_k {args.top_k}; {machine['date_utc']} UTC.\n\n{table}\n"
        )
    print(f"wrote {args.output}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
