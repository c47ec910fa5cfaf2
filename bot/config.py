"""The bot's settings: one pydantic model loaded from a TOML file (see config.example.toml).

Every key has a default, so ``load_config(None)`` gives a working local setup (the demo uses it).
Errors name the offending key (``limits.max_steps: ...``) so an operator can fix the file quickly.
This module must stay torch-free: GPU detection asks ``nvidia-smi`` or /proc, never CUDA itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.intake import IntakeLimits
from trainer.format.checkpoint import TINY_CONFIGS, TOY_BASES, toy_base_path
from trainer.models.refs import A1111_SUBFOLDER, is_base_model_path, model_folders

MiB = 1024 * 1024
DISCORD_API = "https://discord.com/api/v10"


class ConfigError(ValueError):
    """The config file is unreadable or has bad values; the message names each key."""


class _Section(BaseModel):
    # A typo in the file must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")


class DiscordConfig(_Section):
    token_env: str = "LORAFORGE_TOKEN"
    guild_ids: list[int] = Field(default_factory=list)
    admin_user_ids: list[int] = Field(default_factory=list)
    admin_role_ids: list[int] = Field(default_factory=list)
    trainer_role_ids: list[int] = Field(default_factory=list)  # empty: everyone may train
    allow_dms: bool = False
    progress_mode: Literal["thread", "dm"] = "thread"
    progress_interval_s: float = Field(5.0, ge=1.0, le=600.0)
    public_base_url: str = "http://localhost:8080"
    link_secret_env: str = "LORAFORGE_LINK_SECRET"
    link_ttl_s: int = Field(24 * 3600, ge=60, le=30 * 24 * 3600)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    # Publish the slash commands on start when they changed since the last publish (bot/publish.py).
    publish_commands_on_start: bool = True
    # The Discord REST API; another address only for a Discord-compatible server (or a test double).
    api_url: str = DISCORD_API

    @field_validator("public_base_url", "api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class LimitsConfig(_Section):
    max_queued_per_user: int = Field(3, ge=1, le=10_000)
    max_running_per_user: int = Field(1, ge=1, le=1000)
    daily_gpu_minutes_per_user: float = Field(120.0, ge=0)  # 0: no quota
    stall_timeout_s: float = Field(600.0, gt=0)
    cancel_grace_s: float = Field(60.0, gt=0)
    max_steps: int = Field(5000, ge=1, le=200_000)
    max_resolution: int = Field(1024, ge=64, le=4096)
    # upload checks (storage.intake.IntakeLimits)
    max_image_mib: float = Field(20.0, gt=0)
    max_image_side: int = Field(8192, ge=64)
    max_image_pixels: int = Field(40_000_000, ge=4096)
    min_image_side: int = Field(64, ge=1)
    zip_max_entries: int = Field(2000, ge=1)
    zip_max_mib: float = Field(200.0, gt=0)
    zip_max_total_mib: float = Field(500.0, gt=0)
    zip_max_ratio: float = Field(100.0, ge=1)
    max_caption_bytes: int = Field(64 * 1024, ge=16)
    # stored bytes per user (dataset images + job results); 0: no quota. Admins too: it guards the disk.
    max_storage_mib_per_user: float = Field(2048.0, ge=0)
    # free space under data_dir below which no job starts and uploads are refused (0: no guard)
    min_free_disk_mib: float = Field(1024.0, ge=0)
    # per-user cooldown of /preview, /merge and /dataset create: cooldown_uses per cooldown_s (0: none)
    cooldown_s: float = Field(30.0, ge=0, le=24 * 3600)
    cooldown_uses: int = Field(2, ge=1, le=1000)
    # attachments downloaded at the same time over all commands (a flood waits its turn)
    max_parallel_downloads: int = Field(4, ge=1, le=64)

    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(
            max_file_bytes=int(self.max_image_mib * MiB),
            max_width=self.max_image_side,
            max_height=self.max_image_side,
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
            zip_max_entries=self.zip_max_entries,
            zip_max_total_bytes=int(self.zip_max_total_mib * MiB),
            zip_max_ratio=self.zip_max_ratio,
            zip_max_bytes=int(self.zip_max_mib * MiB),
            max_caption_bytes=self.max_caption_bytes,
        )


class WorkersConfig(_Section):
    devices: list[str] = Field(default_factory=list)  # empty: one per GPU, else one "cpu"
    restart_backoff_s: float = Field(2.0, ge=0, le=600)
    ready_timeout_s: float = Field(300.0, gt=0)
    # The command that starts one worker; --device and --models-dir are appended. Empty: the real
    # engine (python -m trainer.jobs.worker). Tests point it at a protocol-speaking stand-in.
    worker_cmd: list[str] = Field(default_factory=list)
    # Extra environment variables (names or shell patterns) passed to workers beyond the built-in
    # allow-list (bot.worker_env). Names that look like credentials are never passed.
    env_pass: list[str] = Field(default_factory=list)
    # The memory of the smallest GPU a job may run on, in GiB ("10 GB" cards hold 10 GiB). /train refuses a job
    # whose memory plan does not fit it. 0: what the CUDA workers report; on a CPU-only host, no check.
    gpu_memory_gib: float = Field(0.0, ge=0, le=4096)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        for d in v:
            base = d.split(":", 1)[0]
            if base not in ("cpu", "cuda", "mps", "xpu"):
                raise ValueError(f"unknown device {d!r}; use cpu, cuda, cuda:N, mps or xpu")
        return v


class ExecutorConfig(_Section):
    """Where jobs run: ``local`` worker processes (the default, no Ray needed) or a Ray cluster (bot/ray_executor.py;
    ``pip install -e '.[ray]'``). The scheduler stays the one source of truth either way."""

    kind: Literal["local", "ray"] = "local"
    # A Ray cluster address ("10.0.0.5:6379", "ray://host:10001"), or "local" to start one in this process.
    address: str = "local"
    namespace: str = Field("loraforge", min_length=1, max_length=100)
    # Jobs running at once on the cluster; 0: as many as the cluster has GPUs (nodes, on a CPU-only cluster).
    slots: int = Field(0, ge=0, le=10_000)
    gpus_per_job: float = Field(1.0, ge=0, le=64)
    cpus_per_job: float = Field(1.0, ge=0, le=256)
    # On each node: the content-addressed input cache and the jobs' working folders. Keep it the same path on every
    # node: a job resumed on another node then sees the same dataset paths (the engine's data fingerprint).
    node_cache_dir: str = "/tmp/loraforge-ray"
    poll_s: float = Field(1.0, gt=0, le=30)  # a long poll: how long an actor holds a poll open for events


class Config(_Section):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    discord: DiscordConfig = Field(default_factory=DiscordConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @property
    def data_dir(self) -> Path:
        return self.paths.data_dir

    @property
    def models_dir(self) -> Path:
        return self.paths.models_dir

    def worker_devices(self) -> list[str]:
        """The configured devices, or one worker per detected NVIDIA GPU, or a single CPU worker."""
        if self.workers.devices:
            return list(self.workers.devices)
        n = detect_gpu_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]

    def worker_command(self) -> list[str]:
        return list(self.workers.worker_cmd) or [sys.executable, "-m", "trainer.jobs.worker"]

    def token(self) -> str | None:
        return os.environ.get(self.discord.token_env) or None

    def link_secret(self) -> str | None:
        return os.environ.get(self.discord.link_secret_env) or None


# Built-in models: the toy bases pretrained on the toy world (what a fresh install previews and demos with), then the
# random-weight tiny models (trainer.models.builtin.TINY_MODELS), from the torch-free config facts.
TOY_MODELS = tuple(TOY_BASES)
BUILTIN_MODELS = (*TOY_MODELS, *TINY_CONFIGS.values())


def list_base_models(models_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(name to pass as base_model, description): single-file .safetensors checkpoints and diffusers
    folders in the models folder (A1111 layout, also its Stable-diffusion/ subfolder), then the tiny ones.
    The folders and kinds are the engine's own (trainer.models.refs), so every listed name loads."""
    out: list[tuple[str, str]] = []
    root = Path(models_dir)
    for folder in model_folders(root):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir(), key=lambda x: x.name.lower()):
            if not is_base_model_path(p):
                continue
            rel = p.relative_to(root).as_posix()
            what = "diffusers folder" if p.is_dir() else f"checkpoint, {p.stat().st_size / (1024 ** 3):.1f} GiB"
            out.append((rel, what))
    out += [(m, "built-in toy base (pretrained on the toy world: shapes, colours, a chibi girl)") for m in TOY_MODELS
            if toy_base_path(m).is_file()]  # a checkout whose bases were not re-created yet lists none
    out += [(m, "built-in tiny model, random weights (tests)") for m in TINY_CONFIGS.values()]
    return out


def is_listed_base_model(name: str, models_dir: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is one of ``list_base_models`` (a checkpoint also without its .safetensors, one in the
    Stable-diffusion/ subfolder also by its bare name, as the engine finds it)."""
    names = {n for n, _ in list_base_models(models_dir)}
    forms = (name, f"{name}.safetensors", f"{A1111_SUBFOLDER}/{name}", f"{A1111_SUBFOLDER}/{name}.safetensors")
    return any(f in names for f in forms)


def detect_gpu_count() -> int:
    """Count NVIDIA GPUs without importing torch (the bot process never loads CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    count = 0
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
            count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            count = 0
    if not count:
        gpus = Path("/proc/driver/nvidia/gpus")
        if gpus.is_dir():
            count = sum(1 for _ in gpus.iterdir())
    if visible is not None and count:
        count = min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.example.toml)"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


TOKEN_KEYS = ("token", "bot_token", "discord_token")


def _refuse_token(values: dict[str, Any]) -> None:
    """A token in a file ends up in backups, screenshots and git; the config only names its variable."""
    discord_section = values.get("discord")
    for key in TOKEN_KEYS:
        for where, table in (("", values), ("discord.", discord_section)):
            if isinstance(table, dict) and key in table:
                env = (discord_section or {}).get("token_env") if isinstance(discord_section, dict) else None
                raise ConfigError(f"{where}{key}: the bot token does not go in the config file; remove this line "
                                  f"and use {env or 'LORAFORGE_TOKEN'} (an environment variable) instead")


def config_from_dict(values: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML table. Relative paths resolve against ``base_dir`` (the file's folder)."""
    _refuse_token(values)
    try:
        cfg = Config.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_format_errors(err)}") from None
    if base_dir is not None:
        for key in ("data_dir", "models_dir"):
            p = getattr(cfg.paths, key)
            if not p.is_absolute():
                setattr(cfg.paths, key, (base_dir / p).resolve())
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read a TOML config file; ``None`` gives the built-in defaults (paths relative to the CWD)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return config_from_dict(values, base_dir=p.resolve().parent)
