from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import GROUPS, REPO

from sphana.config import compose, validate, write_params
from sphana.errors import ConfigError


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("option", ["default", "tiny"])
def test_every_shipped_config_composes(group: str, option: str) -> None:
    cfg = validate(compose(REPO / "conf", [f"{group}={option}"]))
    assert cfg.release.version


def test_params_yaml_is_the_composition_of_conf(tmp_path: Path) -> None:
    text = write_params(REPO / "conf", tmp_path / "params.yaml")
    assert (REPO / "params.yaml").read_text(encoding="utf-8") == text, (
        "params.yaml is stale: run `sphana params` and commit it"
    )


def test_dvc_composes_the_same_params_with_the_schema(tmp_path: Path) -> None:
    """DVC composes conf/ itself on `dvc exp run`; the schema must apply there too."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), [])
    assert out.read_text(encoding="utf-8") == (REPO / "params.yaml").read_text(encoding="utf-8")
    with pytest.raises(Exception, match="embedding.lr"):
        compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), ["embedding.lr=fast"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["embedding.lr=fast"], "embedding.lr"),
        (["ingest.on_error=maybe"], "ingest.on_error"),
        (["embedding.nope=1"], "embedding.nope"),
        (["+embedding.nope=1"], "embedding.nope"),
        (["ingest.overlap_tokens=100"], "ingest.overlap_tokens"),
        (["embedding.version=one"], "embedding.version"),
        (["release.components=[embedding,oracle]"], "release.components"),
        (["llm.train_on=[qa,summaries]"], "llm.train_on"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose(REPO / "conf", overrides))


def test_unknown_key_in_params_yaml_names_the_key() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["export"]["parity"]["fp32_tolerance"] = 1e-3
    with pytest.raises(ConfigError, match=r"export\.parity\.fp32_tolerance"):
        validate(params)


def test_stage_entry_point_reads_params_and_applies_overrides(tmp_path: Path) -> None:
    """`python stages/x.py key=value` works ad hoc; a bad key fails with its name, no traceback."""
    from conftest import run

    proc = run(
        [sys.executable, str(REPO / "stages/ingest.py"), "ingest.chunk_tokens=oops"],
        cwd=REPO,
        check=False,
    )
    assert proc.returncode != 0
    assert "ingest.chunk_tokens" in proc.stderr
    assert not (REPO / "outputs").exists()


def test_stage_entry_point_switches_a_config_group(tmp_path: Path) -> None:
    """`python stages/x.py ingest=tiny` composes conf/ with the group, as `sphana params` would,
    and leaves the DVC-tracked params.yaml alone."""
    import json

    from conftest import run

    params_before = (REPO / "params.yaml").read_bytes()
    out = tmp_path / "ingest"
    run(
        [sys.executable, str(REPO / "stages/ingest.py"), "ingest=tiny", f"paths.ingest={out}"],
        cwd=REPO,
    )
    tiny = validate(compose(REPO / "conf", ["ingest=tiny"])).ingest.chunk_tokens
    default = validate(compose(REPO / "conf")).ingest.chunk_tokens
    assert tiny < default  # else the run below could not tell them apart
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["chunks"] > 0
    assert report["tokens_per_chunk"]["max"] <= tiny
    assert (REPO / "params.yaml").read_bytes() == params_before
    assert not (REPO / "outputs").exists()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("embedding=nope", ["embedding", "nope", "available: default, tiny"]),
        ("embedding.lr=fast", ["embedding.lr"]),
    ],
)
def test_stage_entry_point_rejects_a_bad_group_switch_in_one_line(
    override: str, names: list[str]
) -> None:
    """An unknown option names the group, the option and the options there are; a bad value
    next to a group switch names its key; neither shows a traceback."""
    from conftest import run

    proc = run(
        [sys.executable, str(REPO / "stages/ingest.py"), "ingest=tiny", override],
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ingest failed:")
    for name in names:
        assert name in lines[0]


def test_cli_help_is_plain_text() -> None:
    from conftest import sphana

    out = sphana("--help", cwd=REPO).stdout
    assert "``" not in out
    for command in ("params", "verify", "validate", "stats", "artifacts"):
        assert command in out


def test_quieted_libraries_leave_sphanas_own_warnings_on_stderr() -> None:
    from conftest import run

    code = (
        "import logging; from sphana.entry import quiet_libraries; quiet_libraries(); "
        "logging.getLogger('sphana.export.llm').warning('ours: the 4-bit file was not shipped'); "
        "logging.getLogger('root').warning('theirs: run pre-processing'); "
        "logging.getLogger('torch.onnx').warning('theirs: exporter detail')"
    )
    stderr = run([sys.executable, "-c", code], cwd=REPO).stderr
    assert "ours: the 4-bit file was not shipped" in stderr
    assert "theirs" not in stderr


def test_stage_without_its_inputs_says_what_to_build_first(tmp_path: Path) -> None:
    from conftest import run

    proc = run(
        [
            sys.executable,
            str(REPO / "stages/train_embedding.py"),
            "embedding=tiny",
            f"paths.datasets={tmp_path / 'nothing'}",
        ],
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train.jsonl: not found" in proc.stderr and "dvc repro train_embedding" in proc.stderr


def test_int8_recipes_are_a_list_and_a_wrong_one_is_named() -> None:
    from sphana.config import Quantization

    cfg = validate(compose(REPO / "conf", ["export.quantization=[per_channel_ffn_fp32]"]))
    assert cfg.export.quantization == [Quantization.per_channel_ffn_fp32]
    assert validate(compose(REPO / "conf")).export.quantization == [
        Quantization.per_channel,
        Quantization.per_channel_ffn_fp32,
        Quantization.per_channel_sensitive,
    ]
    for wrong in ("[per_layer]", "per_channel"):  # unknown; one recipe not in a list
        with pytest.raises(ConfigError, match=r"export\.quantization"):
            validate(compose(REPO / "conf", [f"export.quantization={wrong}"]))
