"""`dsa layers`: rank the layers of a converted model by what sparse attention costs in perplexity.

DSA's perplexity loss is rarely spread evenly: on SmolLM2-135M a few layers lose most of it. For each
layer l this measures the perplexity with only layer l sparse (every other layer dense), then keeps
dense the layers with the largest single-layer excess, one more at a time, and measures the whole
model each time. The result shows which `dense_layers` buy back the most quality per dense layer.

Pick the layers on training text, then check them with `dsa eval` on held-out text: layers chosen on
the evaluation text would flatter it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import dsa
from dsa.evaluation.evaluate import _configure, _negative_log_likelihood, _windows
from dsa.evaluation.report import machine_info
from dsa.integrations.hf.convert import get_runtime

logger = logging.getLogger(__name__)

KIND_LABELS = {"dsa": "DSA", "oracle": "oracle"}


@dataclass
class LayerScanSettings:
    context_length: int = 2048
    """Tokens per window."""
    top_k: int | None = None
    """Keys per query of the sparse layers; None keeps the model's configured top_k."""
    windows: int = 1
    """Windows of `context_length` tokens whose perplexity is pooled."""
    max_dense: int = 8
    """Largest number of dense layers in the greedy curve."""
    oracle: bool = False
    """Also measure each layer alone with the oracle's selection (the best any indexer can do there)."""
    logits_chunk: int = 1024

    def validate(self, num_layers: int) -> None:
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length} is invalid; expected an integer >= 2 (tokens).")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} is invalid; expected an integer >= 1 (keys per query).")
        if self.windows < 1:
            raise ValueError(f"windows={self.windows} is invalid; expected an integer >= 1.")
        if not 0 <= self.max_dense <= num_layers:
            raise ValueError(f"max_dense={self.max_dense} is invalid; expected 0 to {num_layers}, the number of layers the scan covers.")


def _perplexity(model, windows, settings: LayerScanSettings) -> float:
    total, count = 0.0, 0
    for window in windows:
        nll, tokens = _negative_log_likelihood(model, window, settings.logits_chunk)
        total, count = total + nll, count + tokens
    return math.exp(total / count)


def scan_layers(model, tokenizer, text: str, settings: LayerScanSettings | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Return the per-layer perplexity cost of sparse attention and the greedy dense-layer curve.

    Keys of the result: "dense" (perplexity), "sparse_layers" (the layers the scan covers),
    "single_layer" ({kind: {layer: excess}}, excess = perplexity / dense - 1 with only that layer sparse),
    "ranking" (layers by descending DSA single-layer excess) and "curve" (a list of
    {"dense_layers": [...], "perplexity": p, "excess": e} for 0 to max_dense dense layers).
    The model's own `dense_layers` are left dense throughout. The model's DSA state is restored on exit.
    """
    settings = settings or LayerScanSettings()
    runtime = get_runtime(model)
    base_dense = sorted(runtime.config.dense_layers)
    layers = [state.layer_idx for state in runtime.layers if state.layer_idx not in base_dense]
    settings.validate(len(layers))
    settings = replace(settings, top_k=settings.top_k or runtime.config.top_k)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = _windows(token_ids, settings.context_length, settings.windows)
    kinds = ("dsa", "oracle") if settings.oracle else ("dsa",)
    saved = (runtime.mode, runtime.selection, runtime.config, runtime.measure_recall)
    steps = 1 + len(kinds) * len(layers) + settings.max_dense + 1
    model.eval()
    result: dict[str, Any] = {"settings": asdict(settings), "base_dense_layers": base_dense, "sparse_layers": layers}
    try:
        with tqdm(total=steps, desc="dsa layers", unit="run", disable=not show_progress) as progress:
            _configure(model, "dense", None, measure_recall=False)
            dense = _perplexity(model, windows, settings)
            progress.update(1)
            result["dense"] = dense
            result["single_layer"] = {}
            for kind in kinds:
                excess = {}
                for layer in layers:
                    _configure(model, kind, settings.top_k, measure_recall=False)
                    dsa.update_config(model, dense_layers=[i for i in range(len(runtime.layers)) if i != layer])
                    excess[layer] = _perplexity(model, windows, settings) / dense - 1
                    progress.update(1)
                result["single_layer"][kind] = excess
            ranking = sorted(layers, key=lambda layer: -result["single_layer"]["dsa"][layer])
            result["ranking"] = ranking
            curve = []
            for count in range(settings.max_dense + 1):
                chosen = sorted(base_dense + ranking[:count])
                _configure(model, "dsa", settings.top_k, measure_recall=False)
                dsa.update_config(model, dense_layers=chosen)
                perplexity = _perplexity(model, windows, settings)
                curve.append({"dense_layers": chosen, "perplexity": perplexity, "excess": perplexity / dense - 1})
                progress.update(1)
                logger.info("dense layers %s (%d added to the scan's base): DSA perplexity %.3f (%+.2f%%)",
                            chosen, count, perplexity, 100 * (perplexity / dense - 1))
            result["curve"] = curve
    finally:
        runtime.mode, runtime.selection, runtime.measure_recall = saved[0], saved[1], saved[3]
        dsa.update_config(model, top_k=saved[2].top_k, dense_layers=list(saved[2].dense_layers))
    result["top_k"] = settings.top_k
    return result


def markdown(result: dict[str, Any], command: str | None = None) -> str:
    settings = result["settings"]
    lines = ["# DSA layer scan", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    lines += [
        f"{settings['windows']} window(s) of {settings['context_length']} tokens, `top_k` {result['top_k']}; "
        f"dense perplexity {result['dense']:.3f}. Excess is the perplexity increase over dense attention.",
        "",
        "Keeping dense the layers with the largest single-layer excess, one more at a time:",
        "",
    ]
    if result["base_dense_layers"]:
        lines += [f"Layers {result['base_dense_layers']} stay dense throughout (the model's `dense_layers`) and are not scanned.", ""]
    lines += [
        "| dense layers | count | DSA perplexity | DSA excess |",
        "| --- | ---: | ---: | ---: |",
    ]
    for point in result["curve"]:
        lines.append(f"| {point['dense_layers'] or 'none'} | {len(point['dense_layers'])} | {point['perplexity']:.3f} | {100 * point['excess']:+.2f}% |")
    kinds = list(result["single_layer"])
    lines += ["", "Perplexity excess with only one layer sparse, by descending DSA excess:", "",
              "| layer | " + " | ".join(f"{KIND_LABELS[kind]} excess" for kind in kinds) + " |",
              "| ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for layer in result["ranking"]:
        lines.append(f"| {layer} | " + " | ".join(f"{100 * result['single_layer'][kind][layer]:+.2f}%" for kind in kinds) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    layers = result["sparse_layers"]
    kinds = list(result["single_layer"])
    width = 0.8 / len(kinds)
    for position, kind in enumerate(kinds):
        values = [100 * result["single_layer"][kind][layer] for layer in layers]
        axes[0].bar([layer + (position - (len(kinds) - 1) / 2) * width for layer in layers], values, width, label=KIND_LABELS[kind])
    axes[0].set_xlabel("layer (the only sparse one)")
    axes[0].set_ylabel("perplexity excess over dense (%)")
    axes[0].set_title("Cost of making one layer sparse")
    axes[0].legend()
    counts = [len(point["dense_layers"]) for point in result["curve"]]
    axes[1].plot(counts, [100 * point["excess"] for point in result["curve"]], "o-")
    axes[1].set_xlabel("dense layers (largest single-layer excess first)")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylabel("DSA perplexity excess (%)")
    axes[1].set_title(f"Whole model at {result['settings']['context_length']} tokens, top_k {result['top_k']}")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_scan(result: dict[str, Any], folder: str | Path, command: str | None = None) -> list[Path]:
    """Write layers.json, layers.md and layers.png to `folder`; return the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "layers.json", folder / "layers.md"]
    written[0].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(result, command), encoding="utf-8")
    try:
        written.append(_plot(result, folder / "layers.png"))
    except ImportError:
        logger.warning("matplotlib is not installed; skipped the plot (pip install matplotlib).")
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa layers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="default",
                        help="Local model folder, a converted model saved with save_pretrained, or 'default' for the embedded SmolLM2-135M-Instruct (default: %(default)s).")
    parser.add_argument("--indexer_path", help="Indexer adapter folder; required unless the model is already converted.")
    parser.add_argument("--data", required=True, help="Plain-text file (UTF-8) to measure perplexity on; use training text, not the evaluation text.")
    parser.add_argument("--output_dir", required=True, help="Folder for layers.json, layers.md and layers.png; must not already contain layers.json.")
    parser.add_argument("--context_length", type=int, default=2048, help="Tokens per window (default: %(default)s).")
    parser.add_argument("--top_k", type=int, help="Keys per query of the sparse layers (default: the adapter's top_k).")
    parser.add_argument("--windows", type=int, default=1, help="Windows of --context_length tokens pooled for perplexity (count, default: %(default)s).")
    parser.add_argument("--max_dense", type=int, default=8, help="Largest number of dense layers in the greedy curve (count, default: %(default)s).")
    parser.add_argument("--dense_layers", type=int, nargs="*",
                        help="Layers kept dense throughout and left out of the scan; give the flag alone for none (default: the adapter's dense_layers).")
    parser.add_argument("--oracle", action="store_true", help="Also measure each layer alone with the oracle's selection (doubles the scan's time).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing layers.json in --output_dir.")
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsa.evaluation.main import prepare_run

    args = build_parser().parse_args(argv)
    output = Path(args.output_dir)
    model, tokenizer, text = prepare_run(args, "layers.json")
    settings = LayerScanSettings(context_length=args.context_length, top_k=args.top_k, windows=args.windows,
                                 max_dense=args.max_dense, oracle=args.oracle)
    result = scan_layers(model, tokenizer, text, settings)
    result["machine"] = machine_info()
    result["model"] = args.model_name_or_path
    result["indexer_path"] = args.indexer_path
    command = "dsa layers " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    for path in write_scan(result, output, command):
        logger.info("Wrote %s", path)
    first, best = result["curve"][0], result["curve"][-1]
    print(f"dense perplexity {result['dense']:.3f}; DSA excess {100 * first['excess']:+.2f}% with dense_layers={first['dense_layers']}, "
          f"{100 * best['excess']:+.2f}% with dense_layers={best['dense_layers']}")
    return 0


if __name__ == "__main__":
    from dsa.cli import run_console

    sys.exit(run_console(main, "dsa layers"))
