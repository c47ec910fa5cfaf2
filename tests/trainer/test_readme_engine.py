"""The README's "The engine alone" commands run as written, in order, in a folder laid out like a fresh clone
(examples/ and nothing built), with tiny settings appended: 2 training steps at 64 px on the CPU. The placeholders
the README uses (my_pics, my_model.safetensors in models/, my_config.toml) are made first, as a user would."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from trainer.jobs.cli import main
from trainer.models.single_file import materialize_tiny_single_file

ROOT = Path(__file__).resolve().parents[2]
PREFIX = [".venv/bin/python", "-m", "trainer"]
TRAIN_TINY = ["--set", "steps=2", "--set", "data.resolution=64", "--device", "cpu"]
# The copier check wants a 20% better copy than 2 steps of a random tiny model give: any improvement passes here.
DIFFERENCE_TINY = [*TRAIN_TINY, "--set", "difference.copier_min_improvement=0"]
# `demo` trains for a minute: tests/trainer/test_cli.py::test_demo_trains_and_prints_its_files runs it.
SKIP = {"demo"}


def readme_engine_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The engine alone", 1)[1].split("```", 2)[1].split("\n", 1)[1]  # after "```sh"
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[:3] == PREFIX, f"not an engine command: {line}"
            commands.append(argv[3:])
    return commands


def _tiny(argv: list[str]) -> list[str]:
    if argv[0] == "run" and "difference" in argv[1]:
        return DIFFERENCE_TINY
    if argv[0] == "train" or (argv[0] == "run" and "tiny-sd15" in argv[1]):
        return TRAIN_TINY
    return []


@pytest.mark.slow  # ~25 s of CPU: three 2-step trainings, a 2-pass difference run, a merge and a grid
def test_every_engine_command_in_the_readme_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    commands = readme_engine_commands()
    assert {c[0] for c in commands} >= {"demo", "train", "presets", "validate", "run", "inspect", "plan",
                                        "import-kohya"}
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "examples" / "images", tmp_path / "my_pics")
    (tmp_path / "models").mkdir()
    shutil.copy(materialize_tiny_single_file("tiny-sd15"), tmp_path / "models" / "my_model.safetensors")
    shutil.copy(ROOT / "tests" / "trainer" / "data" / "kohya" / "config_file.toml", tmp_path / "my_config.toml")
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        if argv[0] in SKIP:
            continue
        rc = main([*argv, *_tiny(argv)])
        out = capsys.readouterr()
        assert rc == 0, f"{shlex.join(argv)} exited {rc}: {out.err[-1500:]}"
    for made in ("runs/scs", "runs/tiny/outputs/tiny-demo.safetensors", "runs/merge/outputs/tiny-merged.safetensors",
                 "runs/preview", "runs/difference", "job.toml"):
        assert (tmp_path / made).exists(), made
