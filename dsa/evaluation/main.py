"""`dsa eval`: perplexity, recall and passkey retrieval of dense attention, the oracle and DSA."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import dsa
from dsa.evaluation.evaluate import EvalSettings, evaluate
from dsa.evaluation.report import machine_info, write_report

logger = logging.getLogger("dsa.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa eval", description=__doc__)
    parser.add_argument("--model_name_or_path", default="default",
                        help="Local model folder, a converted model saved with save_pretrained, or 'default' for the embedded SmolLM2-135M-Instruct (default: %(default)s).")
    parser.add_argument("--indexer_path", help="Indexer adapter folder (written by dsa train or dsa.save_indexer); required unless the model is already converted.")
    parser.add_argument("--data", required=True, help="Held-out plain-text file (UTF-8) for perplexity windows and passkey filler.")
    parser.add_argument("--output_dir", required=True, help="Folder for results.json, report.md and the PNG plots; must not already hold results.json.")
    parser.add_argument("--context_lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="Window lengths in tokens (default: %(default)s).")
    parser.add_argument("--top_k", type=int, nargs="+", default=[64, 128, 256, 512], help="top_k values (keys per query) for oracle and DSA (default: %(default)s).")
    parser.add_argument("--windows", type=int, default=2, help="Windows of each length averaged for perplexity and recall (count, default: %(default)s).")
    parser.add_argument("--passkey_trials", type=int, default=20, help="Passkey trials per length for dense and for DSA; 0 skips the passkey test (count, default: %(default)s).")
    parser.add_argument("--passkey_top_k", type=int, help="top_k of the DSA passkey runs (keys per query); default: the adapter's top_k.")
    parser.add_argument(
        "--dense_layers", type=int, nargs="*",
        help="Layer indices that keep dense attention for oracle and DSA (default: the adapter's dense_layers).",
    )
    parser.add_argument(
        "--indexer_score_dtype", choices=("float32", "bfloat16"),
        help="dtype of the DSA indexer's q . k product (DSAConfig.indexer_score_dtype); default: the adapter's, float32 unless set.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the passkey values and positions (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing results.json in --output_dir.")
    return parser


def load_converted_model(model_name_or_path: str, indexer_path: str | None):
    """Return (model, tokenizer) with a trained indexer attached, in fp32 eval mode."""
    path = str(dsa.default_model_path()) if model_name_or_path == "default" else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(AutoConfig.from_pretrained(path), "dsa_config", None) is not None and indexer_path is None:
        return dsa.from_pretrained(path, dtype=torch.float32).eval(), tokenizer
    if indexer_path is None:
        raise ValueError(f"{path} is not a converted DSA model; pass --indexer_path with a trained indexer adapter.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dsa.load_indexer(model, indexer_path)
    return model, tokenizer


def prepare_run(args: argparse.Namespace, result_name: str):
    """Check the output folder and the text file of a `dsa eval` or `dsa layers` run, then return
    (model, tokenizer, text) with `--dense_layers` applied. Sets up logging first."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    existing = Path(args.output_dir) / result_name
    if existing.exists() and not args.overwrite:
        raise FileExistsError(f"{existing} already exists; pass --overwrite or choose another --output_dir.")
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"text file not found: {data}.")
    model, tokenizer = load_converted_model(args.model_name_or_path, args.indexer_path)
    if args.dense_layers is not None:
        dsa.update_config(model, dense_layers=args.dense_layers)
    if getattr(args, "indexer_score_dtype", None) is not None:
        dsa.update_config(model, indexer_score_dtype=args.indexer_score_dtype)
    return model, tokenizer, data.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output_dir)
    model, tokenizer, text = prepare_run(args, "results.json")
    settings = EvalSettings(context_lengths=args.context_lengths, top_ks=args.top_k, windows=args.windows,
                            passkey_trials=args.passkey_trials, passkey_top_k=args.passkey_top_k, seed=args.seed)
    results = evaluate(model, tokenizer, text, settings)
    results["machine"] = machine_info()
    results["model"] = args.model_name_or_path
    results["indexer_path"] = args.indexer_path
    command = "dsa eval " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if argv is None else argv))
    for path in write_report(results, output, command):
        logger.info("Wrote %s", path)
    print(json.dumps({k: v for k, v in results.items() if k == "lengths"}, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    from dsa.cli import run_console

    sys.exit(run_console(main, "dsa eval"))
