"""Copy-machine (Difference) training on the tiny SD1.5 model at 64 px, CPU.

One uninterrupted run (module fixture) is shared by the checks of what it produced and by the resume test,
which must end with the very same pass-2 LoRA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer.events import JobCancelled, JobFailed  # noqa: E402
from trainer.spec import SpecError, TrainSpec, deep_merge, parse_job, resolve_job  # noqa: E402
from trainer.train.difference import check_pairs, stage_images, train_difference  # noqa: E402

torch.set_num_threads(1)

STEPS1, STEPS2 = 30, 15
MIN_IMPROVEMENT = 0.35


def _draw(path: Path, size: tuple[int, int], edited: bool) -> Path:
    """A smooth picture (gradient + disc); the edit repaints the lower half and adds a white disc."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = (int(255 * x / w), int(255 * y / h), 128)
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.25, h * 0.25, w * 0.75, h * 0.75], fill=(240, 220, 40))
    if edited:
        d.rectangle([0, h * 0.5, w, h], fill=(20, 30, 200))
        d.ellipse([w * 0.1, h * 0.1, w * 0.4, h * 0.4], fill=(250, 250, 250))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _spec(original: Path | str, target: Path | str, **over: Any) -> TrainSpec:
    values = {
        "mode": "difference", "base_model": "tiny-sd15", "output_name": "cm", "steps": STEPS1,
        "data": {"resolution": 64}, "optimizer": {"lr": 1e-2}, "network": {"dim": 8, "conv_dim": 4},
        "state_every_n_steps": 1000,
        "difference": {
            "pairs": [{"name": "front", "original": str(original), "target": str(target)}],
            "copier_min_improvement": MIN_IMPROVEMENT, "save_copier": True,
            "pass2": {"steps": STEPS2, "optimizer": {"lr": 3e-3}, "network": {"dim": 4, "conv_dim": 0}},
        },
    }
    return parse_job(deep_merge(values, over))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    return _draw(d / "front.png", (64, 64), False), _draw(d / "front-edit.png", (64, 64), True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, images: tuple[Path, Path]) -> dict[str, Any]:
    job = tmp_path_factory.mktemp("job-full")
    events: list[dict[str, Any]] = []
    outputs = train_difference(_spec(*images), job, events.append, device="cpu")
    return {"job": job, "outputs": outputs, "events": events}


def _loss(base: Any, image_dir: Path) -> float:
    from trainer.data.dataset import TrainData, scan_dataset
    from trainer.train.losses import eval_denoise_loss

    s = parse_job({"concepts": [{"image_dir": str(image_dir), "caption_mode": "caption_only"}],
                   "data": {"resolution": 64}})
    return eval_denoise_loss(base, TrainData.from_spec(s, scan_dataset(s)), "epsilon", "cpu", seed=1111)  # type: ignore[arg-type]


def test_copier_then_difference(full_run: dict[str, Any]) -> None:
    from trainer.format.kohya import read_kohya
    from trainer.models.load import load_base
    from trainer.network.lora import LoraNetwork, apply_kohya_file

    job, out, events = full_run["job"], full_run["outputs"], full_run["events"]
    final = Path(out["lora"])
    copier = Path(out["copier"])
    assert final == job / "outputs" / "cm-front.safetensors" and final.is_file()
    assert copier == job / "outputs" / "cm-front-copier.safetensors" and copier.is_file()

    # progress names the pair and the pass; the check image is announced between the passes
    phases = [e["name"] for e in events if e["type"] == "phase"]
    assert "pair front: pass 1 of 2 (copier)" in phases and "pair front: pass 2 of 2 (difference)" in phases
    assert any(e["type"] == "progress" and e["pass"] == 2 and e["pair"] == "front" for e in events)
    [img] = [e for e in events if e["type"] == "file" and e["kind"] == "image"]
    assert Path(img["path"]).is_file() and img["pair"] == "front" and img["pass"] == 1
    assert [e["type"] for e in events].count("started") == 1 and events[-1]["type"] == "finished"

    base = load_base("tiny-sd15")
    orig_dir = job / "difference" / "front" / "data" / "original"
    target_dir = job / "difference" / "front" / "data" / "target"
    base_orig = _loss(base, orig_dir)
    # the copier alone lowers the denoising loss on the original substantially
    cop = apply_kohya_file(base, copier, adapter="c")
    copier_orig, copier_target = _loss(base, orig_dir), _loss(base, target_dir)
    assert copier_orig < (1 - MIN_IMPROVEMENT) * base_orig, (base_orig, copier_orig)
    assert img["loss_with"] == pytest.approx(copier_orig, rel=1e-4)
    # the pass-2 LoRA on top of the copier lowers the loss on the target relative to the copier alone
    diff = apply_kohya_file(base, final, adapter="d")
    both_target = _loss(base, target_dir)
    assert both_target < copier_target, (copier_target, both_target)
    cop.remove()
    diff.remove()

    # the saved LoRA holds the pass-2 network only: its module set, none of the copier's weights
    lora, cop_lora = read_kohya(final), read_kohya(copier)
    fresh = LoraNetwork.create(base, 4, 4.0)
    assert set(lora.modules) == set(fresh.slots)
    fresh.remove()
    assert set(cop_lora.modules) > set(lora.modules)  # the copier also has conv (LoCon) modules
    assert all(lora.modules[n].rank == 4 for n in lora.modules)
    assert all(not torch.allclose(lora.modules[n].delta(), cop_lora.modules[n].delta()) for n in lora.modules)
    md = lora.metadata
    assert md["loraforge_mode"] == "difference" and json.loads(md["loraforge_difference"])["pair"] == "front"
    assert md["ss_network_dim"] == "4"

    # applied alone to the base, it changes the output
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        ref = base.unet(x, torch.tensor([500]), encoder_hidden_states=hidden).sample
        net = apply_kohya_file(base, final)
        changed = base.unet(x, torch.tensor([500]), encoder_hidden_states=hidden).sample
        net.remove()
    assert (changed - ref).abs().max() > 1e-6


def test_resume_in_either_pass_gives_the_same_lora(tmp_path: Path, images: tuple[Path, Path],
                                                    full_run: dict[str, Any]) -> None:
    job = tmp_path / "job"
    spec = _spec(*images)
    where = {"pass": 0, "calls": 0}

    def on_event(e: dict[str, Any]) -> None:
        if e["type"] == "phase" and "pass" in e and e["pass"] != where["pass"]:
            where["pass"], where["calls"] = e["pass"], 0

    def stop_at(pass_no: int, step: int):  # the loop asks once per step
        def should_stop() -> bool:
            if where["pass"] != pass_no:
                return False
            where["calls"] += 1
            return where["calls"] > step
        return should_stop

    runs: list[list[dict[str, Any]]] = [[], [], []]

    def recorder(run: int):
        def sink(e: dict[str, Any]) -> None:
            runs[run].append(e)
            on_event(e)
        return sink

    def steps(run: int, pass_no: int) -> list[int]:
        return [e["step"] for e in runs[run] if e["type"] == "progress" and e["pass"] == pass_no]

    with pytest.raises(JobCancelled):
        train_difference(spec, job, recorder(0), stop_at(1, 11), device="cpu")
    assert not (job / "outputs" / "cm-front.safetensors").exists()
    where["pass"] = 0
    with pytest.raises(JobCancelled):
        train_difference(spec, job, recorder(1), stop_at(2, 6), device="cpu")
    assert json.loads((job / "difference" / "progress.json").read_text())["pairs"]["front"]["pass1"]["done"]
    # each run goes on after the last step the one before finished (11 in pass 1, then 6 in pass 2)
    assert steps(0, 1)[0] == 1 and steps(1, 1)[0] == 12 and steps(1, 1)[-1] == STEPS1
    out = train_difference(spec, job, recorder(2), device="cpu")
    events = runs[2]
    assert events[0]["type"] == "started" and events[0]["resumed_from"] == STEPS1  # pass 1 was not redone
    assert steps(2, 1) == []
    assert steps(1, 2)[0] == 1 and steps(2, 2)[0] == 7 and steps(2, 2)[-1] == STEPS2

    for key in ("lora", "copier"):
        got, want = load_file(out[key]), load_file(full_run["outputs"][key])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), key


def test_copier_not_converged_is_reported(tmp_path: Path, images: tuple[Path, Path]) -> None:
    spec = _spec(*images, steps=2, optimizer={"lr": 1e-4}, difference={"copier_min_improvement": 0.5})
    events: list[dict[str, Any]] = []
    with pytest.raises(JobFailed) as ei:
        train_difference(spec, tmp_path / "job", events.append, device="cpu")
    assert ei.value.reason == "copier_not_converged"
    [img] = [e for e in events if e["type"] == "file" and e["kind"] == "image"]
    msg = str(ei.value)
    assert f"{img['loss_without']:.4f}" in msg and f"{img['loss_with']:.4f}" in msg
    assert "steps = 2" in msg and "copy-machine-sd15" in msg
    assert Path(img["path"]).is_file()
    assert not (tmp_path / "job" / "outputs" / "cm-front.safetensors").exists()  # pass 2 never ran


@pytest.fixture
def bad_images(tmp_path: Path) -> dict[str, Path]:
    small = _draw(tmp_path / "small.png", (64, 48), True)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    return {"small": small, "broken": broken, "missing": tmp_path / "nope.png"}


@pytest.mark.parametrize(("target", "words"), [
    ("small", "the original is 64x64 but the target is 64x48"),
    ("missing", "the target image"),
    ("broken", "could not be read as an image"),
    ("", "has only one image"),
    ("same", "has only one image"),
    ("copy", "same image as the original"),
])
def test_bad_pairs_are_refused(tmp_path: Path, images: tuple[Path, Path], bad_images: dict[str, Path],
                               target: str, words: str) -> None:
    original = images[0]
    if target == "copy":
        tgt: Path | str = tmp_path / "copy.png"
        Path(tgt).write_bytes(original.read_bytes())
    elif target == "same":
        tgt = original
    else:
        tgt = bad_images[target] if target else ""
    with pytest.raises(JobFailed) as ei:
        train_difference(_spec(original, tgt), tmp_path / "job", device="cpu")
    assert ei.value.reason == "bad_input"
    assert words in str(ei.value) and "front" in str(ei.value)
    assert not (tmp_path / "job" / "outputs").exists()  # refused before anything ran
    if target == "missing":
        assert "nope.png" in str(ei.value)


def test_mismatched_pair_resized_with_the_same_crop(tmp_path: Path, images: tuple[Path, Path],
                                                   bad_images: dict[str, Path]) -> None:
    from trainer.data.images import load_image

    spec = _spec(images[0], bad_images["small"])
    [plan] = check_pairs(spec, resize_pairs=True)
    assert plan.target_resized
    orig_dir, target_dir = stage_images(plan, tmp_path / "front", spec.difference.prompt)  # type: ignore[union-attr]
    assert load_image(next(target_dir.glob("*.png"))).size == load_image(next(orig_dir.glob("*.png"))).size
    assert (target_dir / "target.txt").read_text() == ""  # the difference prompt (empty by default)
    # Duplicate pair names are refused when the spec is validated, before any image is read.
    with pytest.raises(SpecError, match="pair names must be unique"):
        _spec(*images, difference={"pairs": [{"name": "front", "original": str(images[0]),
                                              "target": str(images[1])}] * 2})


def test_copy_machine_presets(tmp_path: Path, images: tuple[Path, Path]) -> None:
    pairs = [{"name": "front", "original": str(images[0]), "target": str(images[1])}]
    sdxl = resolve_job({"difference": {"pairs": pairs}}, "copy-machine-sdxl")
    assert isinstance(sdxl, TrainSpec) and sdxl.mode == "difference" and sdxl.preset == "copy-machine-sdxl"
    assert (sdxl.network.dim, sdxl.network.resolved_alpha, sdxl.network.conv_dim, sdxl.network.resolved_conv_alpha,
            sdxl.steps, sdxl.batch_size, sdxl.optimizer.name, sdxl.optimizer.lr, sdxl.optimizer.scheduler,
            sdxl.seed) == (16, 16.0, 8, 8.0, 1000, 1, "Lion", 5e-5, "cosine", 1111)
    p2 = sdxl.pass2_spec()
    assert (p2.network.dim, p2.network.resolved_alpha, p2.network.conv_dim, p2.optimizer.name,
            p2.optimizer.lr) == (4, 4.0, 0, "Lion", 5e-5)

    # the SD1.5 preset trains on the tiny model with overrides: two pairs, one LoRA each, and their merge
    edited2 = _draw(tmp_path / "left-edit.png", (64, 64), True)
    Image.open(edited2).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited2)
    pairs2 = [*pairs, {"name": "left", "original": str(images[0]), "target": str(edited2)}]
    spec = resolve_job({"base_model": "tiny-sd15", "output_name": "cm", "steps": 3, "data": {"resolution": 64},
                        "optimizer": {"lr": 1e-3}, "difference": {"pairs": pairs2, "copier_min_improvement": 0.0, "merge_rank": 2,
                                       "merge_ratio": 0.6, "pass2": {"steps": 2}}}, "copy-machine-sd15")
    assert isinstance(spec, TrainSpec) and spec.network.conv_dim == 8 and spec.pass2_spec().network.dim == 4
    out = train_difference(spec, tmp_path / "job", device="cpu")
    assert set(out["loras"]) == {"front", "left"} and len(out["lora"]) == 2
    from trainer.format.kohya import read_kohya

    merged = read_kohya(out["merged"])
    assert Path(out["merged"]).name == "cm-merged.safetensors"
    assert {m.rank for m in merged.modules.values()} == {2}
    assert set(merged.modules) == set(read_kohya(out["loras"]["front"]).modules)
    # the merge is the SVD merge of the pair LoRAs at merge_ratio each
    from trainer.network.svd_merge import svd_merge

    def products(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[: -len(".alpha")]: float(sd[k]) / sd[k.replace(".alpha", ".lora_down.weight")].shape[0]
                * (sd[k.replace(".alpha", ".lora_up.weight")].float().flatten(1)
                   @ sd[k.replace(".alpha", ".lora_down.weight")].float().flatten(1)) for k in sd if k.endswith(".alpha")}

    got = products(load_file(out["merged"]))
    for ratio in (0.6, 1.0):
        want = products(svd_merge([(out["loras"]["front"], ratio), (out["loras"]["left"], ratio)], rank=2,
                                  conv_rank=2))
        # over all modules (a near-zero module's relative error means nothing): ~3e-4 at 0.6, 0.4 at 1.0
        err = sum(float((got[k] - want[k]).norm()) for k in want) / sum(float(want[k].norm()) for k in want)
        assert (err < 1e-2) == (ratio == 0.6), (ratio, err)


def test_saved_copier_is_reused(tmp_path: Path, images: tuple[Path, Path], full_run: dict[str, Any]) -> None:
    copier = full_run["outputs"]["copier"]
    events: list[dict[str, Any]] = []
    out = train_difference(_spec(*images, difference={"copier": copier}), tmp_path / "job", events.append,
                           device="cpu")
    assert events[0]["total_steps"] == STEPS2  # pass 1 skipped
    assert any(e["type"] == "log" and "reusing the copier" in e["message"] for e in events)
    assert any(e["type"] == "file" and e["kind"] == "image" for e in events)  # the check still ran
    assert not any(e["type"] == "progress" and e["pass"] == 1 for e in events)
    assert "copier" not in out  # the user already has it
    # the same copier and target give the same difference LoRA as the job that trained the copier
    got, want = load_file(out["lora"]), load_file(full_run["outputs"]["lora"])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_saved_copier_of_another_original_is_refused(tmp_path: Path, images: tuple[Path, Path],
                                                     full_run: dict[str, Any]) -> None:
    """The copier records the original it learned (sha256); reusing it with another original is refused."""
    other = Image.open(images[0]).transpose(Image.Transpose.ROTATE_90).convert("L").convert("RGB")
    other.save(tmp_path / "other.png")
    spec = _spec(tmp_path / "other.png", images[1], difference={"copier": full_run["outputs"]["copier"]})
    with pytest.raises(JobFailed) as ei:
        train_difference(spec, tmp_path / "job", device="cpu")
    assert ei.value.reason == "bad_input"
    msg = str(ei.value)
    assert "was trained on front.png, not on this job's original other.png" in msg, msg
    assert not (tmp_path / "job" / "outputs").exists()  # refused before any training


def test_copy_machine_sdxl_runs_on_tiny_sdxl(tmp_path: Path, images: tuple[Path, Path]) -> None:
    """The SDXL path (two text encoders, pooled embeds, size conditioning, SGM names) end to end, a few steps."""
    from trainer.format.kohya import read_kohya

    pairs = [{"name": "front", "original": str(images[0]), "target": str(images[1])}]
    spec = resolve_job({"base_model": "tiny-sdxl", "output_name": "cm", "steps": 3, "data": {"resolution": 64},
                        "optimizer": {"lr": 1e-3},
                        "difference": {"pairs": pairs, "prompt": "a face", "copier_min_improvement": 0.0,
                                       "pass2": {"steps": 2}}}, "copy-machine-sdxl")
    out = train_difference(spec, tmp_path / "job", device="cpu")  # type: ignore[arg-type]
    lora = read_kohya(out["lora"])
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(n.startswith("lora_unet_") and "_layers_" not in n for n in lora.modules)  # no conv: dim 4 only
    assert {m.rank for m in lora.modules.values()} == {4}
