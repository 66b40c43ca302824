"""Write `dsa eval` results as JSON, a markdown report and PNG plots."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _rows(results: dict[str, Any]):
    for length, entry in results["lengths"].items():
        for key, kinds in entry.items():
            if key.startswith("top_k="):
                yield int(length), int(key.split("=")[1]), entry["dense"], kinds["oracle"], kinds["dsa"]


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    lines = ["# DSA evaluation", ""]
    machine = results.get("machine", {})
    if machine:
        score_dtype = results.get("dsa_config", {}).get("indexer_score_dtype", "float32")
        lines += [f"Machine: {machine.get('processor') or machine.get('machine')}, {machine.get('cpus')} CPUs, "
                  f"torch {machine.get('torch')}, model dtype {machine.get('dtype')}, index scores {score_dtype}.", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    dense_layers = results.get("dsa_config", {}).get("dense_layers") or []
    lines += [
        "Perplexity excess is relative to dense at the same length; recall is the mean share of the dense",
        "attention mass (averaged over heads and layers) that the selected keys cover.",
        "",
    ]
    if dense_layers:
        lines += [
            f"Layers {dense_layers} keep dense attention for oracle and DSA alike; recall is averaged over the other layers.",
            "",
        ]
    lines += [
        "| length | top_k | dense ppl | oracle ppl | DSA ppl | oracle excess | DSA excess | oracle recall | DSA recall | DSA / oracle recall | worst-layer DSA recall |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for length, top_k, dense, oracle, ours in _rows(results):
        base = dense["perplexity"]
        worst = min(ours["recall_per_layer"].values())
        lines.append(
            f"| {length} | {top_k} | {base:.3f} | {oracle['perplexity']:.3f} | {ours['perplexity']:.3f} | "
            f"{100 * (oracle['perplexity'] / base - 1):+.2f}% | {100 * (ours['perplexity'] / base - 1):+.2f}% | "
            f"{oracle['recall_mean']:.3f} | {ours['recall_mean']:.3f} | {ours['recall_mean'] / oracle['recall_mean']:.3f} | {worst:.3f} |"
        )
    passkeys = [(int(length), entry["passkey"]) for length, entry in results["lengths"].items() if "passkey" in entry]
    if passkeys:
        lines += ["", f"Passkey retrieval ({results['settings']['passkey_trials']} trials per length):", "",
                  "| length | top_k | dense accuracy | DSA accuracy |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {length} | {p['top_k']} | {p['dense']:.2f} | {p['dsa']:.2f} |" for length, p in passkeys]
    lines += ["", *quality_checks(results)]
    return "\n".join(lines) + "\n"


def quality_checks(results: dict[str, Any]) -> list[str]:
    """Return markdown lines checking DSA against the oracle at every measured (length, top_k).

    The criteria: DSA recall at least 95% of the oracle's; DSA perplexity excess at most 1.5 times the
    oracle's; pass-key accuracy equal to dense.
    """
    lines = [
        "Quality checks against the oracle (recall at least 95% of the oracle's; perplexity excess at most",
        "1.5 times the oracle's; pass-key accuracy equal to dense):",
        "",
        "| length | top_k | DSA / oracle recall | recall check | DSA excess / oracle excess | perplexity check |",
        "| ---: | ---: | ---: | :---: | ---: | :---: |",
    ]
    for length, top_k, dense, oracle, ours in _rows(results):
        recall_ratio = ours["recall_mean"] / oracle["recall_mean"]
        oracle_excess = oracle["perplexity"] / dense["perplexity"] - 1
        ours_excess = ours["perplexity"] / dense["perplexity"] - 1
        excess_ratio = ours_excess / oracle_excess if oracle_excess > 0 else float("inf")
        excess_ok = ours_excess <= 1.5 * max(oracle_excess, 0.0)
        lines.append(
            f"| {length} | {top_k} | {recall_ratio:.3f} | {'met' if recall_ratio >= 0.95 else 'missed'} | "
            f"{excess_ratio:.1f} | {'met' if excess_ok else 'missed'} |"
        )
    for length, entry in sorted(results["lengths"].items(), key=lambda item: int(item[0])):
        if "passkey" in entry:
            passkey = entry["passkey"]
            verdict = "met" if passkey["dsa"] >= passkey["dense"] else "missed"
            lines.append(f"\nPass key at {length}: DSA {passkey['dsa']:.2f} against dense {passkey['dense']:.2f}, {verdict}.")
    return lines


def _plot(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(_rows(results))
    lengths = sorted({row[0] for row in rows})
    top_ks = sorted({row[1] for row in rows})
    written = []

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = [results["lengths"][str(length)]["dense"]["perplexity"] for length in lengths]
    axes[0].plot(lengths, dense, "k-o", label="dense")
    for top_k in top_ks:
        for kind, style in (("oracle", "--"), ("dsa", "-")):
            values = [next(r for r in rows if r[0] == length and r[1] == top_k)[3 if kind == "oracle" else 4]["perplexity"] for length in lengths]
            axes[0].plot(lengths, values, style, marker=".", label=f"{kind} k={top_k}")
            recalls = [next(r for r in rows if r[0] == length and r[1] == top_k)[3 if kind == "oracle" else 4]["recall_mean"] for length in lengths]
            axes[1].plot(lengths, recalls, style, marker=".", label=f"{kind} k={top_k}")
    for axis, title, label in ((axes[0], "Perplexity", "perplexity"), (axes[1], "Recall of dense attention mass", "recall")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = folder / "perplexity_recall.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)

    longest = str(lengths[-1])
    figure, axis = plt.subplots(figsize=(12, 4))
    for top_k in top_ks:
        kinds = results["lengths"][longest][f"top_k={top_k}"]
        for kind, style in (("oracle", "--"), ("dsa", "-")):
            per_layer = kinds[kind]["recall_per_layer"]
            axis.plot([int(k) for k in per_layer], list(per_layer.values()), style, marker=".", label=f"{kind} k={top_k}")
    axis.set_xlabel("layer")
    axis.set_ylabel("recall")
    axis.set_title(f"Recall per layer at {longest} tokens")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=4)
    figure.tight_layout()
    path = folder / "recall_per_layer.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written


def machine_info() -> dict[str, Any]:
    import os

    return {"machine": platform.machine(), "processor": _cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "dtype": "float32"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_report(results: dict[str, Any], folder: str | Path, command: str | None = None) -> list[Path]:
    """Write results.json, report.md and the PNG plots to `folder`; return the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "report.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown(results, command), encoding="utf-8")
    try:
        written += _plot(results, folder)
    except ImportError:
        logger.warning("matplotlib is not installed; skipped the plots (pip install matplotlib).")
    return written
