"""Evaluation of DSA against dense attention and the attention-mass oracle: `dsa eval`."""

from dsa.evaluation.evaluate import EvalSettings, evaluate
from dsa.evaluation.layers import LayerScanSettings, scan_layers

__all__ = ["EvalSettings", "LayerScanSettings", "evaluate", "scan_layers"]
