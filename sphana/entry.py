"""Glue between a ``@hydra.main`` stage script and its :mod:`sphana.pipeline` function.

A stage composes ``params.yaml`` (what DVC ran it with) plus any ``key=value`` overrides. An
override that switches a config group (``embedding=tiny``, where ``conf/embedding/tiny.yaml``
exists) cannot apply to params.yaml, which has no defaults list: the stage then composes
``conf/config.yaml`` with all the overrides instead, exactly as ``sphana params embedding=tiny``
would, and leaves params.yaml (a DVC-tracked file) as it is.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

# Stage scripts compose params.yaml in the working directory (DVC runs them from the repo root).
CONFIG_PATH = os.getcwd()
# ... or conf/config.yaml there, when an override switches a config group.
CONF_DIR = Path(CONFIG_PATH) / "conf"
# Hydra's run directory, .hydra/ snapshot and log files would litter the repository: off.
_HYDRA_ARGS = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]
# Flags by which the user chooses the primary config: then leave that choice alone.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# `group=option`: a bare name (no dot, slash or +/~ prefix) and a value that can be a file stem.
_GROUP_OVERRIDE = re.compile(r"([A-Za-z_]\w*)=([\w.-]+)")
# What the stage's params were composed from, as named in validation errors.
_source = "params.yaml"


def hydra_args() -> None:
    """Call before the ``@hydra.main`` function: keeps Hydra from writing outputs/ and logs, and
    composes ``conf/`` instead of params.yaml when an override switches a config group.

    An unknown option (``embedding=nope``) or a bad override exits 1 with one line naming it.
    """
    global _source
    user = sys.argv[1:]
    sys.argv[1:1] = [a for a in _HYDRA_ARGS if a not in sys.argv]
    if any(a.split("=")[0] in _CONFIG_FLAGS for a in user):
        return
    groups = group_overrides(user, CONF_DIR)
    if not groups:
        return
    overrides = [  # not flags (--cfg job), nor our hydra.* settings
        a for a in user if ("=" in a or a.startswith("~")) and not re.match(r"-|[+~]*hydra[./]", a)
    ]
    from sphana.config import compose
    from sphana.errors import SphanaError

    try:  # Hydra's own composition errors span lines: compose once to report one line
        compose(CONF_DIR, overrides)
    except SphanaError as e:
        _fail(Path(sys.argv[0]).stem, str(e))
    # Options after the overrides: argparse drops positionals that follow an optional.
    sys.argv += ["--config-path", str(CONF_DIR), "--config-name", "config"]
    _source = f"{CONF_DIR.name}/ with {' '.join(groups)}"


def group_overrides(overrides: list[str], conf_dir: Path) -> list[str]:
    """The ``group=option`` overrides among ``overrides`` (``conf_dir/<group>/`` exists).

    Raises:
        SystemExit: for an option that ``conf_dir/<group>/`` does not have, after printing one
            line naming the group, the option and the available options.
    """
    found = []
    for arg in overrides:
        match = _GROUP_OVERRIDE.fullmatch(arg)
        if not match or not (conf_dir / match[1]).is_dir():
            continue
        group, option = match.groups()
        if not (conf_dir / group / f"{option}.yaml").is_file():
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            _fail(
                Path(sys.argv[0]).stem,
                f"{arg}: config group '{group}' has no option '{option}' "
                f"({conf_dir.name}/{group}/{option}.yaml); available: {', '.join(options)}",
            )
        found.append(arg)
    return found


def _fail(stage: str, message: str) -> NoReturn:
    """One line on stderr, exit 1: bad input never shows a traceback."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(
        f"[bold red]{stage} failed:[/] {escape(message)}", soft_wrap=True
    )
    sys.exit(1)


def quiet_libraries() -> None:
    """Progress bars and warnings of the libraries underneath are noise in a stage's log; Sphana's
    own warnings (e.g. why a generator's 4-bit file was not shipped) still reach stderr."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("sphana").setLevel(logging.WARNING)  # not the root's level: ours still show
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

    try:
        result = STAGES[stage](validate(params, source=_source))
    except SphanaError as e:
        _fail(stage, str(e))
    except FileNotFoundError as e:  # an upstream output that was never built
        _fail(
            stage,
            f"{e.filename}: not found; build what this stage reads first "
            f"(`dvc repro {stage}` runs the stages before it)",
        )
    if os.environ.get("RANK", "0") == "0":  # one line per stage, also under torchrun
        Console(stderr=True, highlight=False).print(f"[green]{stage}[/] done", _summary(result))
    return result


def _summary(result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    keys = (
        "documents",
        "chunks",
        "passages",
        "questions",
        "ignored_by_extension",
        "skipped_count",
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
            if key == "fp32" and "max_abs_diff" in value:  # an export report
                value = {"max_abs_diff": value["max_abs_diff"]}
            elif key == "fp32":  # the evaluate stage's
                value = {k: value[k] for k in ("recall@5", "ndcg@10") if k in value}
            elif key == "embedding" and isinstance(value, dict) and "pairs" in value:
                value = {"pairs": value["pairs"]}
            elif key == "embedding" and isinstance(value, dict) and "file" in value:
                value = value["file"]  # the index's
            elif key == "members":
                value = len(value)
            parts.append(f"{key}={value}")
    return " ".join(parts)
