"""One safetensors header parser (trainer/format/header.py) behind every entry point: crafted headers get the same
clear refusal, in the same words, from the bot's upload check and from the engine's LoRA and checkpoint readers,
never a raw TypeError / KeyError / UnicodeDecodeError."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.lorafile import LoraCheckError, inspect_bytes, inspect_file

torch = pytest.importorskip("torch")

from trainer.format.kohya import LoraFileError, read_kohya, read_kohya_bytes, read_metadata  # noqa: E402
from trainer.models.single_file import CheckpointError, read_safetensors_header  # noqa: E402

NAME = "crafted.safetensors"
Q = "lora_unet_down_blocks_0_attentions_0_proj_in"


def raw_file(header: object, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    """A file from a header object (JSON-encoded) or raw header bytes, with an optional lying length field."""
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def lora_file(dtype: str = "F32", alpha_dtype: str = "F32", alpha: float | int = 2) -> bytes:
    """A valid 1-module linear LoRA (rank 2, 4 -> 4) with the given dtypes."""
    from safetensors.torch import save

    torch_dtype = {"F32": torch.float32, "I64": torch.int64}
    w = 0.1 if dtype == "F32" else 1
    return save({f"{Q}.lora_down.weight": torch.full((2, 4), w, dtype=torch_dtype[dtype]),
                 f"{Q}.lora_up.weight": torch.full((4, 2), w, dtype=torch_dtype[dtype]),
                 f"{Q}.alpha": torch.tensor(alpha, dtype=torch_dtype[alpha_dtype])})


CRAFTED: dict[str, tuple[bytes, str]] = {
    # case: (file bytes, words the refusal must contain)
    "float offsets": (raw_file({"a": entry("F32", [2], [0.5, 8])}, b"\0" * 8), "bad data_offsets"),
    "string offsets": (raw_file({"a": entry("F32", [2], ["0", "8"])}, b"\0" * 8), "bad data_offsets"),
    "null offsets": (raw_file({"a": entry("F32", [2], [None, 8])}, b"\0" * 8), "bad data_offsets"),
    "bool offsets": (raw_file({"a": entry("U8", [1], [False, True])}, b"\0"), "bad data_offsets"),
    "one offset": (raw_file({"a": entry("F32", [2], [8])}, b"\0" * 8), "bad data_offsets"),
    "negative offset": (raw_file({"a": entry("F32", [2], [-8, 0])}, b"\0" * 8), "bad data_offsets"),
    "end before start": (raw_file({"a": entry("F32", [2], [8, 0])}, b"\0" * 8), "bad data_offsets"),
    "overlapping": (raw_file({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, b"\0" * 12),
                    "overlap"),
    "gap between tensors": (raw_file({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [8, 12])},
                                     b"\0" * 12), "unused bytes"),
    "beyond the file": (raw_file({"a": entry("F32", [250], [0, 1000])}, b"\0" * 8), "truncated"),
    "bytes after the tensors": (raw_file({"a": entry("F32", [2], [0, 8])}, b"\0" * 12), "unexpected bytes"),
    "huge header length": (raw_file({}, raw=b"{}", length=2**63), "header claims"),
    "header longer than file": (raw_file({}, raw=b"{}", length=4096), "header claims"),
    "non-UTF-8 header": (raw_file({}, raw=b'{"\xff\xfe": 1}'), "damaged"),
    "non-JSON header": (raw_file({}, raw=b"{oops"), "damaged"),
    "JSON list header": (raw_file([1, 2]), "damaged"),
    "deeply nested header": (raw_file({}, raw=b"[" * 100_000 + b"]" * 100_000), "damaged"),
    "entry not an object": (raw_file({"a": [1, 2, 3]}), "malformed"),
    "entry without shape": (raw_file({"a": {"dtype": "F32", "data_offsets": [0, 0]}}), "malformed"),
    "unknown dtype": (raw_file({"a": entry("Q99", [2], [0, 8])}, b"\0" * 8), "unknown dtype"),
    "dtype not a string": (raw_file({"a": entry(7, [2], [0, 8])}, b"\0" * 8), "unknown dtype"),
    "bad shape": (raw_file({"a": entry("F32", [-2], [0, 8])}, b"\0" * 8), "bad shape"),
    "shape/bytes mismatch": (raw_file({"a": entry("F32", [3], [0, 8])}, b"\0" * 8), "wrong byte size"),
    "metadata not strings": (raw_file({"__metadata__": {"ss_network_dim": 4}}), "metadata"),
    "metadata not an object": (raw_file({"__metadata__": 0}), "metadata"),
    "three bytes": (b"abc", "not a safetensors file"),
    "pickle": (b"\x80\x04\x95" + b"\0" * 40, "pickle"),
}


def _refusal(call: Callable[[], object], error: type[Exception]) -> str:
    with pytest.raises(error) as e:  # the entry point's own class: a TypeError/KeyError would fail here
        call()
    return str(e.value)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_every_entry_point_refuses_crafted_headers_in_the_same_words(case: str, tmp_path: Path) -> None:
    data, words = CRAFTED[case]
    path = tmp_path / NAME
    path.write_bytes(data)
    refusals = {
        "bot inspect_bytes": _refusal(lambda: inspect_bytes(data, NAME), LoraCheckError),
        "bot inspect_file": _refusal(lambda: inspect_file(path), LoraCheckError),
        "engine read_kohya": _refusal(lambda: read_kohya(path), LoraFileError),
        "engine read_kohya_bytes": _refusal(lambda: read_kohya_bytes(data, NAME), LoraFileError),
        "engine read_metadata": _refusal(lambda: read_metadata(path), LoraFileError),
        "engine checkpoint header": _refusal(lambda: read_safetensors_header(path), CheckpointError),
    }
    texts = set(refusals.values())
    assert len(texts) == 1, refusals
    text = texts.pop()
    assert f"`{NAME}`" in text and words in text, text


def test_integer_alpha_is_accepted_everywhere_integer_weights_are_not(tmp_path: Path) -> None:
    """kohya's svd_merge_lora.py writes alpha as an int64 scalar; such files load. Weights must stay float."""
    merged = lora_file(alpha_dtype="I64", alpha=2)
    path = tmp_path / NAME
    path.write_bytes(merged)
    info = inspect_bytes(merged, NAME)
    assert info.rank == 2 and info.modules[Q][0] == "linear"
    assert inspect_file(path).rank == 2
    for lora in (read_kohya(path), read_kohya_bytes(merged, NAME)):
        m = lora.modules[Q]
        assert m.alpha == 2.0 and m.scale == 1.0  # alpha / rank, as every loader applies it
        torch.testing.assert_close(m.delta(), torch.full((4, 4), 0.02))

    ints = lora_file(dtype="I64", alpha_dtype="I64")
    path.write_bytes(ints)
    texts = {_refusal(lambda: inspect_bytes(ints, NAME), LoraCheckError),
             _refusal(lambda: inspect_file(path), LoraCheckError),
             _refusal(lambda: read_kohya(path), LoraFileError),
             _refusal(lambda: read_kohya_bytes(ints, NAME), LoraFileError)}
    assert len(texts) == 1
    assert "lora_down.weight` has dtype I64; LoRA weights must be F16, BF16, F32 or F64" in texts.pop()


def test_a_checkpoint_sent_as_a_lora_is_named_the_same_way(tmp_path: Path) -> None:
    ckpt = raw_file({"model.diffusion_model.input_blocks.0.0.weight": entry("F16", [2], [0, 4])}, b"\0" * 4)
    path = tmp_path / NAME
    path.write_bytes(ckpt)
    texts = {_refusal(lambda: inspect_bytes(ckpt, NAME), LoraCheckError),
             _refusal(lambda: read_kohya(path), LoraFileError)}
    assert len(texts) == 1 and "full Stable Diffusion checkpoint (a base model), not a LoRA" in texts.pop()
