"""docs/job-file.md is generated from the spec and kept in sync; examples/ run as written; the README points at them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.jobs.cli import main
from trainer.spec_doc import DOC_PATH, SECTIONS, job_file_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_reference_is_what_the_spec_generates() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == job_file_markdown(), "run `python -m trainer docs`"


def test_every_setting_is_documented() -> None:
    text = job_file_markdown()
    for _, model, _, _ in SECTIONS:
        for name in model.model_fields:
            rows = [r for r in text.splitlines() if r.startswith(f"| `{name}` |")]
            assert rows, f"{model.__name__}.{name} is missing"
            cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
            assert len(cells) == 6 and all(cells[i] for i in (1, 2, 5)), rows[0]  # type, default, description


def test_examples_validate_and_the_readme_points_at_them(capsys: pytest.CaptureFixture[str]) -> None:
    kinds = {}
    for f in sorted((ROOT / "examples").glob("*.toml")):
        assert main(["validate", str(f)]) == 0, capsys.readouterr().err
        resolved = capsys.readouterr().out
        kinds[f.name] = re.search(r'^kind = "(\w+)"', resolved, re.M).group(1)  # type: ignore[union-attr]
        if 'mode = "difference"' in resolved:
            kinds[f.name] = "difference"
    assert sorted(kinds.values()) == ["difference", "merge", "preview", "train"], kinds
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    engine = readme.split("## The engine alone", 1)[1].split("```", 2)[1]
    named = re.findall(r"-m trainer (?:run|train|validate|plan) (\S+\.toml)", engine)
    assert "examples/merge.toml" in named and "examples/preview.toml" in named
    for path in named:
        assert (ROOT / path).is_file(), f"the README names {path}, which does not exist"
