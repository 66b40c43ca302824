"""Evaluation of DSA against dense attention and the attention-mass oracle: `dsa eval`."""

from dsa.evaluation.evaluate import EvalSettings, evaluate

__all__ = ["EvalSettings", "evaluate"]
