import sys
from pathlib import Path

import pytest

# make `import fakediscord` work whatever the pytest import mode / invocation
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture
async def fake_discord():
    """A running FakeDiscord; discord.py's REST/gateway/CDN base URLs point at it for the test's duration."""
    from fakediscord import FakeDiscord

    async with FakeDiscord() as fake:
        yield fake
