"""The card a /train job is checked against: the config's, else the smallest the CUDA workers reported, else none."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bot.errors import InvalidInput
from bot.plan import card_bytes, plan_line
from trainer.plan import GiB
from trainer.spec import parse_job


def test_the_card_comes_from_the_config_then_the_workers() -> None:
    workers = [SimpleNamespace(memory_bytes=12 * GiB), SimpleNamespace(memory_bytes=10 * GiB),
               SimpleNamespace(memory_bytes=None)]
    assert card_bytes(8.0, workers) == 8 * GiB
    assert card_bytes(None, workers) == 10 * GiB  # a job may land on the smallest card
    assert card_bytes(None, [SimpleNamespace(memory_bytes=None)]) is None  # CPU workers report nothing


def test_no_card_no_word_and_no_refusal() -> None:
    huge = parse_job({"base_model": "sdxl", "batch_size": 64, "data": {"resolution": 2048}})
    assert plan_line(huge, None) == ""
    with pytest.raises(InvalidInput, match="SDXL 2048 batch 64 needs"):
        plan_line(huge, 24 * GiB)
    assert plan_line(parse_job({"base_model": "no-such-model"}), 8 * GiB) == ""  # the engine explains that one


def test_a_cpu_worker_reports_no_card() -> None:
    from trainer.jobs.worker import card_memory

    assert card_memory("cpu") is None
