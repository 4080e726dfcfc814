"""Glue between a ``@hydra.main`` stage script and its :mod:`sphana.pipeline` function."""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig

# Stage scripts compose params.yaml in the working directory (DVC runs them from the repo root).
CONFIG_PATH = os.getcwd()
# Hydra's run directory, .hydra/ snapshot and log files would litter the repository: off.
_HYDRA_ARGS = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def hydra_args() -> None:
    """Call before the ``@hydra.main`` function: keeps Hydra from writing outputs/ and logs."""
    sys.argv[1:1] = [a for a in _HYDRA_ARGS if a not in sys.argv]


def quiet_libraries() -> None:
    """Progress bars and warnings of the libraries underneath are noise in a stage's log."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run(stage: str, params: DictConfig) -> Any:
    """Validate ``params`` and run ``stage``; a :class:`SphanaError` exits 1 with its message."""
    from rich.console import Console

    quiet_libraries()

    from sphana.config import validate
    from sphana.errors import SphanaError
    from sphana.pipeline import STAGES

    console = Console(stderr=True, highlight=False)
    try:
        result = STAGES[stage](validate(params))
    except SphanaError as e:
        console.print(f"[bold red]{stage} failed:[/] {e}", soft_wrap=True)
        sys.exit(1)
    if os.environ.get("RANK", "0") == "0":  # one line per stage, also under torchrun
        console.print(f"[green]{stage}[/] done", _summary(result))
    return result


def _summary(result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    keys = (
        "documents",
        "chunks",
        "embedding",
        "fine_tuned",
        "fp32",
        "version",
        "members",
        "bundles",
    )
    parts = []
    for key in keys:
        if key in result:
            value = result[key]
            if key == "fp32":
                value = {"max_abs_diff": value["max_abs_diff"]}
            elif key == "embedding" and isinstance(value, dict) and "pairs" in value:
                value = {"pairs": value["pairs"]}
            elif key == "members":
                value = len(value)
            parts.append(f"{key}={value}")
    return " ".join(parts)
