"""Numbers as people read them (bot.humanize): the result post's summary, durations, rates."""

from __future__ import annotations

from bot.humanize import format_duration, format_size, sig, summary_text


def test_two_significant_digits() -> None:
    assert [sig(x) for x in (3.0666666, 0.034567, 123.4, 12345.0, 1.0, 0.0, 29.22395266000001)] == [
        "3.1", "0.035", "120", "12000", "1.0", "0", "29"]
    assert sig(None) is None and sig("x") is None and sig(float("nan")) is None


def test_durations_and_sizes() -> None:
    assert [format_duration(x) for x in (4.4, 65.2, 3 * 3600 + 4 * 60, 50 * 3600)] == ["4s", "1m05s", "3h04m", "2d2h"]
    assert format_size(512) == "512 bytes" and format_size(1.25 * 1024 * 1024) == "1.2 MiB"


def test_train_summary_reads_as_a_sentence_not_raw_floats() -> None:
    text = summary_text({"steps": 200, "resumed_from": 0, "elapsed_s": 65.22395266000001,
                         "steps_per_s": 3.0666666666, "first_loss": 0.51234567, "final_loss": 0.0345678,
                         "device": "cuda:0", "prediction_type": "epsilon", "lora_bytes": 9_876_543})
    assert text == ("took 1m05s \u00b7 200 steps at 3.1 steps/s \u00b7 loss 0.51 \u2192 0.035 \u00b7 "
                    "LoRA file 9.4 MiB \u00b7 on cuda:0"), text
    assert "resumed" in summary_text({"steps": 10, "resumed_from": 4})


def test_merge_and_preview_summaries() -> None:
    assert summary_text({"inputs": 2, "arch": "sd1", "rank": 8, "conv_rank": 4, "seconds": 3.14159}) == (
        "took 3s \u00b7 2 input(s) \u00b7 rank 8, conv rank 4")
    text = summary_text({"inputs": 2, "rank": 4, "relative_error": 0.01234, "retained_energy": 0.99985,
                         "block_error": {"TE": 0.0, "IN01": 0.05, "OUT03": 0.001234}, "clamped_modules": 0})
    assert text == ("2 input(s) \u00b7 rank 4 \u00b7 merge error 1.2% of the exact weighted sum (energy kept 100%); "
                    "per block: TE 0.0%, IN01 5.0%, OUT03 0.12%"), text
    assert summary_text({"seconds": 0.4, "cells": 18}) == "took 0s \u00b7 18 images"
    assert summary_text({"odd_value": 0.123456, "flag": True}) == "odd value 0.12 \u00b7 flag True"
