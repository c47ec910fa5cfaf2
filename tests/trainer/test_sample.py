"""Sampling with tiny models: samplers, deterministic seeds, LoRA swaps without reloading, grids, preview jobs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from PIL import Image  # noqa: E402

from trainer.events import JobFailed  # noqa: E402
from trainer.format.kohya import save_kohya  # noqa: E402
from trainer.infer.grid import BACKGROUND, fit_cell, strength_seed_grid  # noqa: E402
from trainer.infer.pipeline import SAMPLER_NAMES, make_scheduler  # noqa: E402
from trainer.infer.sample import Sampler, render_with_network, run_preview_job  # noqa: E402
from trainer.models.load import load_base  # noqa: E402
from trainer.network.targets import lora_targets  # noqa: E402
from trainer.spec import GridSpec, SamplePrompt, parse_job  # noqa: E402

STEPS = 3


def tiny_lora(base, rank=4, seed=0, scale=0.3, conv=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for t in lora_targets(base.unet, base.text_encoders, base.arch, conv=conv, train_te=True):
        sd[f"{t.kohya_name}.lora_down.weight"] = torch.randn(t.down_shape(rank), generator=g) * scale
        sd[f"{t.kohya_name}.lora_up.weight"] = torch.randn(t.up_shape(rank), generator=g) * scale
        sd[f"{t.kohya_name}.alpha"] = torch.tensor(float(rank) / 2)
    return sd


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


@pytest.fixture(scope="module")
def sampler():
    return Sampler("tiny-sd15", device="cpu")


@pytest.fixture(scope="module")
def lora_files(sampler, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    paths = []
    for i in range(2):
        p = d / f"l{i}.safetensors"
        save_kohya(p, tiny_lora(sampler.base, seed=i), {"ss_base_model_version": "sd_v1"})
        paths.append(p)
    return paths


def snapshot(base) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in enumerate([base.unet, *base.text_encoders])
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_sampler_is_deterministic_per_seed(sampler, name):
    a = sampler.render("a red car", seed=1111, steps=STEPS, sampler=name)
    b = sampler.render("a red car", seed=1111, steps=STEPS, sampler=name)
    c = sampler.render("a red car", seed=2222, steps=STEPS, sampler=name)
    assert a.size == (64, 64)
    assert np.array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(c))


def test_schedulers_follow_the_base_config():
    sd2 = load_base("tiny-sd2")
    for name in SAMPLER_NAMES:
        s = make_scheduler(name, sd2.noise_scheduler.config)
        assert s.config.prediction_type == "v_prediction"
        assert s.config.beta_schedule == "scaled_linear"
    assert make_scheduler("dpmpp_2m_karras", sd2.noise_scheduler.config).config.use_karras_sigmas
    assert not make_scheduler("dpmpp_2m", sd2.noise_scheduler.config).config.use_karras_sigmas
    assert make_scheduler("dpmpp_2m", sd2.noise_scheduler.config).config.algorithm_type == "dpmsolver++"
    img = Sampler(sd2, device="cpu").render("x", seed=1, steps=2, sampler="euler")
    assert img.size == (64, 64)


def test_lora_strengths_and_swaps_keep_the_base(sampler, lora_files):
    unet, pipe_unet = sampler.base.unet, sampler.pipe.unet
    before = snapshot(sampler.base)
    kw = {"seed": 1111, "steps": STEPS, "sampler": "euler"}
    base_img = arr(sampler.render("a cat", **kw))
    zero = arr(sampler.render("a cat", loras=[(lora_files[0], 0.0)], **kw))
    one = arr(sampler.render("a cat", loras=[(lora_files[0], 1.0)], **kw))
    neg = arr(sampler.render("a cat", loras=[(lora_files[0], -1.0)], **kw))
    other = arr(sampler.render("a cat", loras=[(lora_files[1], 1.0)], **kw))
    both = arr(sampler.render("a cat", loras=[(lora_files[0], 1.0), (lora_files[1], 0.5)], **kw))
    again = arr(sampler.render("a cat", loras=[(lora_files[0], 1.0)], **kw))
    assert np.array_equal(zero, base_img)
    assert not np.array_equal(one, base_img) and not np.array_equal(neg, base_img)
    assert not np.array_equal(neg, one) and not np.array_equal(other, one) and not np.array_equal(both, one)
    assert np.array_equal(again, one)  # swapping back gives the same image
    assert sampler.base.unet is unet and sampler.pipe.unet is unet is pipe_unet  # never reloaded
    sampler.clear_loras()
    after = snapshot(sampler.base)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact base weights again
    assert np.array_equal(arr(sampler.render("a cat", **kw)), base_img)


def test_sdxl_lora_with_original_names(tmp_path):
    s = Sampler("tiny-sdxl", device="cpu")
    before = snapshot(s.base)
    lora = tiny_lora(s.base, seed=4)
    assert any("input_blocks" in k for k in lora)  # SDXL files name the UNet the SGM way
    kw = {"seed": 3, "steps": 2, "sampler": "euler_a"}
    base_img = arr(s.render("a dog", **kw))
    with_lora = arr(s.render("a dog", loras=[(lora, 0.8)], **kw))
    assert not np.array_equal(base_img, with_lora)
    s.clear_loras()
    after = snapshot(s.base)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_grid_cells_equal_individual_renders(sampler, lora_files):
    grid = GridSpec(prompt="a cat in a hat", strengths=[-1.0, 0.0, 0.5, 1.0, 1.5, 2.0], seeds=[1111, 2222, 3333],
                    steps=2, sampler="euler")
    cells = sampler.render_grid([(lora_files[0], 1.0)], grid)
    img, boxes = strength_seed_grid(cells, grid.strengths, grid.seeds, grid.prompt)
    assert len(boxes) == 18
    px = np.asarray(img)
    cw = boxes[0][2] - boxes[0][0]
    assert cw >= 128  # tiny 64 px cells are upscaled so the labels fit
    n_cols = len(grid.strengths)
    for c, s in enumerate(grid.strengths):  # strength-major: one LoRA patch per column
        for r, seed in enumerate(grid.seeds):
            single = sampler.render(grid.prompt, "", seed, grid.steps, grid.cfg, None, None, grid.sampler,
                                    [(lora_files[0], s)])
            x0, y0, x1, y1 = boxes[r * n_cols + c]  # cells are row-major: rows = seeds, columns = strengths
            assert np.array_equal(px[y0:y1, x0:x1], np.asarray(fit_cell(single, (x1 - x0, y1 - y0)))), (seed, s)
    sampler.clear_loras()
    # rows go down, columns go right
    assert boxes[1][0] > boxes[0][0] and boxes[1][1] == boxes[0][1] and boxes[6][1] > boxes[0][1]
    bg = np.array(BACKGROUND)

    def inked(x0, y0, x1, y1) -> bool:
        return bool((px[y0:y1, x0:x1] != bg).any())

    top = boxes[0][1]
    for c in range(6):  # a column header above every column
        x0, _, x1, _ = boxes[c]
        assert inked(x0, top - 30, x1, top - 1)
    for r in range(3):  # a row label left of every row
        _, y0, _, y1 = boxes[r * 6]
        assert inked(0, y0, boxes[0][0] - 1, y1)
    assert inked(0, 0, px.shape[1], 12)  # the prompt as a title


def test_preview_job_single_image_and_grid(tmp_path, lora_files):
    events = []
    spec = parse_job({"kind": "preview", "base_model": "tiny-sd15", "loras": [{"path": str(lora_files[0]),
                      "strength": 0.7}], "grid": {"prompt": "a cat", "strengths": [1.0], "seeds": [5], "steps": 2},
                      "output_name": "one"})
    ctx: dict = {}
    out = run_preview_job(spec, tmp_path / "a", events.append, context=ctx)
    assert set(out) == {"image"} and Image.open(out["image"]).size == (64, 64)
    assert events[-1]["type"] == "finished" and ("file", "image") in [(e["type"], e.get("kind")) for e in events]
    first = ctx["sampler"]
    spec = parse_job({"kind": "preview", "base_model": "tiny-sd15", "loras": [{"path": str(lora_files[0])}],
                      "grid": {"prompt": "a cat", "strengths": [0.0, 1.0], "seeds": [1, 2], "steps": 2}})
    out = run_preview_job(spec, tmp_path / "b", context=ctx)
    assert set(out) == {"grid"} and Image.open(out["grid"]).size[0] > 2 * 128
    assert ctx["sampler"] is first  # the worker's loaded base is reused between jobs
    missing = parse_job({"kind": "preview", "base_model": "tiny-sd15", "loras": [{"path": str(tmp_path / "nope")}]})
    with pytest.raises(JobFailed):
        run_preview_job(missing, tmp_path / "c")
    xl = tmp_path / "xl.safetensors"
    save_kohya(xl, tiny_lora(load_base("tiny-sdxl"), seed=1), {})
    wrong = parse_job({"kind": "preview", "base_model": "tiny-sd15", "loras": [{"path": str(xl)}],
                       "grid": {"strengths": [1.0], "seeds": [1], "steps": 1}})
    with pytest.raises(JobFailed) as err:
        run_preview_job(wrong, tmp_path / "d", context=ctx)
    assert err.value.reason == "bad_input"


def test_render_with_network_during_training(tmp_path):
    from trainer.network.lora import LoraNetwork

    base = load_base("tiny-sd15")
    net = LoraNetwork.create(base, dim=4, alpha=4.0, seed=0)
    base.unet.train()
    base.text_encoders[0].eval()
    prompts = [SamplePrompt(prompt="a cat", seed=1, steps=2, sampler="euler"),
               SamplePrompt(prompt="a dog", seed=2, steps=2, sampler="ddim")]
    paths = render_with_network(base, net, prompts, tmp_path, step=100)
    assert [p.name for p in paths] == ["step000100_00.png", "step000100_01.png"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    assert base.unet.training and not base.text_encoders[0].training  # modes restored as they were
    assert all(p.requires_grad for p in net.trainable_parameters())
