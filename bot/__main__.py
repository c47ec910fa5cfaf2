"""Console entry: ``python -m bot run`` (the bot), ``python -m bot sync`` (publish the slash commands) and
``python -m bot demo`` (the whole pipeline without Discord)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
from pathlib import Path

from bot.config import ConfigError, load_config

DEFAULT_CONFIG = Path("config.toml")


def _config_and_token(args: argparse.Namespace) -> tuple[object, str] | int:
    """The loaded config and the token, or an exit status after a one-line error."""
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG  # the README's `cp config.example.toml config.toml`
    if path is None:
        print("note: no --config given and no config.toml in this folder: running on the built-in defaults "
              "(data in ./data, models in ./models, everyone may train, server administrators are the admins). "
              "Copy config.example.toml to config.toml to change that.", file=sys.stderr)
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = config.token()
    if not token:
        print(
            f"error: no Discord bot token: set the environment variable {config.discord.token_env} "
            "(the config names it in [discord] token_env; the token itself never goes in the file)",
            file=sys.stderr,
        )
        return 2
    return config, token


def _run(args: argparse.Namespace) -> int:
    got = _config_and_token(args)
    if isinstance(got, int):
        return got
    import bot.app  # lazily: discord.py and the cogs load only for this subcommand

    result = bot.app.run(got[0])  # type: ignore[arg-type]
    if inspect.isawaitable(result):
        result = asyncio.run(result)  # type: ignore[arg-type]
    return int(result or 0)


def _sync(args: argparse.Namespace) -> int:
    got = _config_and_token(args)
    if isinstance(got, int):
        return got
    from bot.publish import sync_from_shell

    return asyncio.run(sync_from_shell(got[0], got[1], args.guild))  # type: ignore[arg-type]


def _demo(args: argparse.Namespace) -> int:
    from bot.demo import main as demo_main

    steps = {"steps": args.steps} if args.steps is not None else {}
    return demo_main(data_dir=Path(args.data_dir), fresh=args.fresh, config_path=args.config, **steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bot", description="loraforge: the Discord LoRA training bot")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the Discord bot")
    r.add_argument("--config", type=Path, default=None, help="TOML config (default: ./config.toml if there, "
                   "else built-in defaults; see config.example.toml)")
    y = sub.add_parser("sync", help="publish the slash commands to Discord (first run, or after an update)")
    y.add_argument("--guild", type=int, default=None, metavar="ID",
                   help="only this server (the commands show at once); default: the config's guild_ids, else global")
    y.add_argument("--config", type=Path, default=None, help="TOML config (default: ./config.toml if there)")
    d = sub.add_parser("demo", help="train a LoRA of a new concept on the toy base end to end without Discord")
    d.add_argument("--data-dir", default="demo-data", help="where the demo keeps its database and files")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 300, the learning tests' recipe)")
    d.add_argument("--fresh", action="store_true", help="delete the data dir first")
    d.add_argument("--config", type=Path, default=None, help="optional config; the demo overrides paths")
    args = p.parse_args(argv)
    # The one log handler (discord.py gets none of its own, so no line shows twice); the bot says what it does.
    quiet = logging.WARNING if args.command == "demo" else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # discord.py's own INFO lines ("logging in using static token") are noise here
        logging.getLogger("discord").setLevel(logging.WARNING)
    return {"run": _run, "sync": _sync, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
