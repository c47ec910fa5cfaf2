"""The job spec: one schema, errors that name the field and the allowed values."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import trainer.spec as spec_mod
from trainer.spec import (
    SpecError,
    from_json,
    list_presets,
    load_job_file,
    parse_job,
    resolve_job,
    to_json,
    to_toml,
)


def test_defaults_and_case_insensitive_names() -> None:
    spec = parse_job({"optimizer": {"name": "lion8bit", "scheduler": "COSINE"}, "network": {"dim": 32, "alpha": 8}})
    assert spec.optimizer.name == "Lion8bit"
    assert spec.optimizer.scheduler == "cosine"
    assert spec.network.resolved_alpha == 8.0
    assert parse_job({}).network.resolved_alpha == 16.0  # alpha defaults to dim


def test_card_fitting_defaults_are_auto_and_explicit_values_stay() -> None:
    spec = parse_job({})
    # resolved at run time on the job's device (trainer.train.loop.resolve_*): bf16/fp16 and SDXL checkpointing on a GPU
    assert spec.mixed_precision == "auto" and spec.gradient_checkpointing is None
    assert spec.data.cache_text_encoder_outputs is None and spec.data.cache_latents
    explicit = parse_job({"mixed_precision": "fp16", "gradient_checkpointing": False,
                          "data": {"cache_text_encoder_outputs": False}})
    assert explicit.mixed_precision == "fp16" and explicit.gradient_checkpointing is False
    assert explicit.data.cache_text_encoder_outputs is False
    # auto survives the TOML/JSON round trip that /retrain and resume rely on (None is left out of TOML)
    assert resolve_job(tomllib.loads(to_toml(spec))) == spec and from_json(to_json(spec)) == spec
    from trainer.train.state import spec_fingerprint

    assert spec_fingerprint(spec) == spec_fingerprint(parse_job({}))
    assert spec_fingerprint(spec) != spec_fingerprint(explicit)
    with pytest.raises(SpecError, match="mixed_precision"):
        parse_job({"mixed_precision": "fp8"})


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"network": {"dim": 0}}, "network.dim", "greater than or equal to 1"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name", "AdamW8bit"),
        ({"stepz": 10}, "stepz", "unknown setting"),
        ({"data": {"resolution": 100}}, "data.resolution", "multiple of 8"),
        ({"steps": -1}, "steps", "greater than or equal to 1"),
        ({"network": {"train_unet": False}}, "network", "nothing would be trained"),
    ],
)
def test_errors_name_the_field(values: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse_job(values)
    fields = [f for f, _ in ei.value.problems]
    assert field in fields
    assert words in str(ei.value)


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "job.toml"
    f.write_text("steps = = 3\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_job_file(f)
    with pytest.raises(SpecError, match="does not exist"):
        load_job_file(tmp_path / "missing.toml")


def test_presets_override_field_by_field() -> None:
    assert {"sd15-8gb", "sdxl-10gb", "sdxl-expression"} <= set(list_presets())
    spec = resolve_job({"network": {"dim": 8}}, "sdxl-expression")
    assert spec.network.dim == 8  # overridden
    assert spec.network.resolved_alpha == 8.0  # kept from the preset
    assert spec.optimizer.name == "Lion"
    assert spec.preset == "sdxl-expression"
    with pytest.raises(SpecError, match="unknown preset"):
        resolve_job({}, "nope")


def test_resolved_spec_round_trips() -> None:
    spec = resolve_job({"steps": 7, "concepts": [{"image_dir": "x", "instance_prompt": "scs girl"}]}, "sd15-8gb")
    assert from_json(to_json(spec)) == spec
    assert "steps = 7" in to_toml(spec)


def test_merge_and_preview_specs() -> None:
    m = parse_job({"kind": "merge", "inputs": [{"path": "a.safetensors", "ratio": -0.6}], "rank": 8})
    assert m.kind == "merge" and m.inputs[0].ratio == -0.6
    with pytest.raises(SpecError, match="rank"):
        parse_job({"kind": "merge", "inputs": [{"path": "a"}], "rank": 0})
    p = parse_job({"kind": "preview", "grid": {"sampler": "DPMPP_2M_KARRAS"}})
    assert p.grid.sampler == "dpmpp_2m_karras"
    assert p.grid.strengths == [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0] and p.grid.seeds == [1111, 2222, 3333]


def test_cli_validate_reports_bad_field(tmp_path: Path) -> None:
    f = tmp_path / "job.toml"
    f.write_text('[optimizer]\nname = "Adam"\n')
    r = subprocess.run([sys.executable, "-m", "trainer", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "optimizer.name" in r.stderr and "Prodigy" in r.stderr
    r = subprocess.run([sys.executable, "-m", "trainer", "validate", str(f), "--set", "optimizer.name=prodigy"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'name = "Prodigy"' in r.stdout


def test_difference_mode_pass2_defaults_to_pass1() -> None:
    spec = parse_job({
        "mode": "difference",
        "steps": 1000,
        "network": {"dim": 16, "alpha": 16, "conv_dim": 8, "conv_alpha": 8},
        "optimizer": {"name": "Lion", "lr": 5e-5},
        "difference": {"pairs": [{"original": "a.png", "target": "b.png"}],
                       "pass2": {"network": {"dim": 4, "alpha": 4, "conv_dim": 0}}},
    })
    p2 = spec.pass2_spec()
    assert (p2.network.dim, p2.network.resolved_alpha, p2.network.conv_dim) == (4, 4.0, 0)
    assert p2.optimizer.name == "Lion" and p2.optimizer.lr == 5e-5 and p2.steps == 1000
    with pytest.raises(SpecError, match="difference.pass2.network.dim"):
        parse_job({"mode": "difference", "difference": {"pairs": [{"original": "a", "target": "b"}],
                                                         "pass2": {"network": {"dim": 0}}}})
    with pytest.raises(SpecError, match="needs a \\[difference\\] section"):
        parse_job({"mode": "difference"})
    with pytest.raises(SpecError, match="target"):
        parse_job({"mode": "difference", "difference": {"pairs": [{"original": "a"}]}})


def test_preset_is_a_closed_list_never_a_path(tmp_path) -> None:
    # A preset outside the presets folder must not be read, whatever the relative path (issue 17).
    evil = tmp_path / "evil.toml"
    evil.write_text('[network]\ndim = 999\n')
    rel = os.path.relpath(evil.with_suffix(""), spec_mod.PRESETS_DIR)
    with pytest.raises(SpecError, match="unknown preset") as e:
        spec_mod.resolve_job({"base_model": "tiny-sd15"}, preset=rel)
    assert "sd15-8gb" in str(e.value)


@pytest.mark.parametrize("kind", ["train", "merge", "preview"])
@pytest.mark.parametrize("name", ["../../etc/x", "/abs", ".hidden", "a/b", "x" * 101, ""])
def test_output_names_never_become_paths(kind: str, name: str) -> None:
    with pytest.raises(SpecError, match="output_name"):
        spec_mod.parse_job({"kind": kind, "output_name": name})
