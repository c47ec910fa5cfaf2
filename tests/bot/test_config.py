from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot.config import Config, ConfigError, config_from_dict, detect_gpu_count, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_example_file_agree(tmp_path: Path) -> None:
    example = ROOT / "config.example.toml"
    cfg = load_config(example)
    default = load_config(None)
    # The example documents every key with its default value.
    assert cfg.model_dump(exclude={"paths"}) == default.model_dump(exclude={"paths"})
    values = tomllib.loads(example.read_text())
    for section, model in Config.model_fields.items():
        documented = set(values.get(section, {}))
        assert documented == set(model.annotation.model_fields), section  # type: ignore[union-attr]
    assert cfg.data_dir == (ROOT / "data").resolve()  # relative to the file


def test_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "[limits]\nmax_steps = 0\n": "limits.max_steps",
        "[discord]\nprogress_mode = 'email'\n": "discord.progress_mode",
        "[workers]\ndevices = ['gpu0']\n": "workers.devices",
        "[limits]\nmax_queud_per_user = 3\n": "limits.max_queud_per_user: unknown key",
        "[discord]\nhttp_port = 'x'\n": "discord.http_port",
        "[discord]\npublic_base_url = 'example.com'\n": "discord.public_base_url",
    }
    for text, key in cases.items():
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert key in str(ei.value), (text, str(ei.value))
    p.write_text("[limits\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_intake_limits_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({"limits": {"max_image_mib": 1, "min_image_side": 32}, "workers": {"devices": ["cuda:1"]}})
    lim = cfg.limits.intake_limits()
    assert lim.max_file_bytes == 1024 * 1024 and lim.min_side == 32
    assert cfg.worker_devices() == ["cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpu_count() == 0
    assert Config().worker_devices() == ["cpu"]
    assert Config().worker_command()[1:] == ["-m", "trainer.jobs.worker"]


def test_bot_modules_never_import_torch() -> None:
    """The whole bot process: the Bot subclass, every bot module and every cog it loads."""
    code = (
        "import sys, bot.config, bot.scheduler, bot.service, bot.workers, bot.demo, bot.__main__\n"
        "import bot.app, bot.progress, bot.delivery, bot.lorafile, bot.autogrid, bot.interactions, bot.views\n"
        "import importlib\n"
        "for name in bot.app.COGS: importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_run_without_token_says_which_variable(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[discord]\ntoken_env = "LF_TEST_TOKEN_UNSET"\n')
    out = subprocess.run([sys.executable, "-m", "bot", "run", "--config", str(p)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "LF_TEST_TOKEN_UNSET" in out.stderr


def test_run_finds_config_toml_or_says_it_uses_defaults(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bot", "run"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=env)
    assert out.returncode == 2
    assert "no config.toml in this folder" in out.stderr and "LORAFORGE_TOKEN" in out.stderr
    (tmp_path / "config.toml").write_text('[discord]\ntoken_env = "LF_FROM_CONFIG_TOML"\n')
    out = subprocess.run([sys.executable, "-m", "bot", "run"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env=env)
    assert out.returncode == 2
    assert "LF_FROM_CONFIG_TOML" in out.stderr and "built-in defaults" not in out.stderr


def test_cogs_reach_the_engine_only_through_bot() -> None:
    """House plan: cogs -> bot -> storage, and only bot imports trainer (its torch-free spec)."""
    import ast

    cogs_dir = Path(__file__).resolve().parents[2] / "cogs"
    offenders = []
    for f in sorted(cogs_dir.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{f.name}: {m}" for m in mods if m.split(".")[0] in ("trainer", "torch", "diffusers")]
    assert offenders == []
