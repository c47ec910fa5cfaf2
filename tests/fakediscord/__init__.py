"""A local fake Discord for running the real discord.py bot offline in tests. See README.md."""

from . import payloads
from .server import Call, FakeDiscord, InteractionRecord, StoredMessage, error_response, json_response

__all__ = [
    "Call",
    "FakeDiscord",
    "InteractionRecord",
    "StoredMessage",
    "error_response",
    "json_response",
    "payloads",
]
