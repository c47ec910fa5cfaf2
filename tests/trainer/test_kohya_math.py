"""The loss and noise options against kohya sd-scripts' maths on identical inputs (to 1e-5).

Expected values are computed here from the formulas of kohya's library/train_util.py (get_huber_threshold_if_needed,
conditional_loss, get_timesteps, get_noise_noisy_latents_and_timesteps) and library/custom_train_functions.py
(fix_noise_scheduler_betas_for_zero_terminal_snr, apply_snr_weight, get_snr_scale,
scale_v_prediction_loss_like_noise_prediction, add_v_prediction_like_loss, apply_debiased_estimation,
pyramid_noise_like, apply_noise_offset), written out term by term; random draws are fed in the same order.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.spec import OptimizerSpec, parse_job
from trainer.train import losses as L
from trainer.train import noise as N
from trainer.train.optim import build_scheduler

torch.set_num_threads(1)

SD_SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012}
T = torch.tensor([0, 1, 10, 250, 500, 750, 990, 999])


def sd_scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHED, **kw)


def kohya_all_snr(sched: DDPMScheduler) -> torch.Tensor:
    ac = sched.alphas_cumprod
    return (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


# --- Huber schedules and loss forms ---------------------------------------------------------------

@pytest.mark.parametrize("c,scale", [(0.1, 1.0), (0.3, 2.0)])
def test_huber_schedules_match_kohya(c, scale):
    sched = sd_scheduler()
    ac = sched.alphas_cumprod[T]
    sigmas = ((1.0 - ac) / ac) ** 0.5
    want = {
        "snr": (1 - c) / (1 + sigmas) ** 2 + c,
        "exponential": torch.exp(-(-math.log(c) / 1000) * T) * scale,
        "constant": torch.full((len(T),), c * scale),
    }
    for name, w in want.items():
        close(L.huber_threshold(T, name, c, scale, sched.alphas_cumprod, 1000), w)
    if c == 0.1:  # the numbers: kohya's default schedule runs from ~0.95 at t=0 to ~0.10 at t=999
        snr_c = L.huber_threshold(T, "snr", c, scale, sched.alphas_cumprod, 1000)
        assert 0.94 < float(snr_c[0]) < 0.96 and 0.1 < float(snr_c[-1]) < 0.105


def test_huber_and_smooth_l1_per_sample_c():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    c = torch.tensor([0.9, 0.3, 0.1])
    cv = c.view(-1, 1, 1, 1)
    hub = (2 * cv * (torch.sqrt((pred - target) ** 2 + cv**2) - cv)).mean(dim=(1, 2, 3))
    sl1 = (2 * (torch.sqrt((pred - target) ** 2 + cv**2) - cv)).mean(dim=(1, 2, 3))
    close(L.per_sample_loss(pred, target, "huber", c), hub)
    close(L.per_sample_loss(pred, target, "smooth_l1", c), sl1)
    close(L.per_sample_loss(pred, target, "huber", 0.3), (2 * 0.3 * (torch.sqrt((pred - target) ** 2 + 0.09) - 0.3))
          .mean(dim=(1, 2, 3)))


# --- SNR-based weightings, in kohya's order --------------------------------------------------------

@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("ztsnr", [False, True])
def test_step_loss_matches_kohyas_post_processing(pred_type, ztsnr):
    base = sd_scheduler()
    sched = N.training_scheduler(base.config, pred_type, ztsnr)
    all_snr = kohya_all_snr(base)  # kohya: computed before the zero-terminal-SNR fix
    table = L.snr(base.alphas_cumprod, torch.arange(1000))
    close(table, all_snr)
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(len(T), 4, 6, 6, generator=g), torch.randn(len(T), 4, 6, 6, generator=g)
    weights = torch.linspace(0.5, 1.5, len(T))
    opts = L.LossOptions(loss_type="huber", huber_c=0.1, huber_schedule="snr", min_snr_gamma=5.0,
                         scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.2, debiased_estimation_loss=True)
    got = L.step_loss(pred, target, T, sched, table, pred_type, opts, weights)

    # kohya, term by term
    ac = sched.alphas_cumprod[T]  # the Huber 'snr' schedule reads the (possibly rescaled) scheduler
    sig = ((1.0 - ac) / ac) ** 0.5
    c = ((1 - 0.1) / (1 + sig) ** 2 + 0.1).view(-1, 1, 1, 1)
    loss = (2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)).mean(dim=(1, 2, 3)) * weights
    snr = torch.stack([all_snr[t] for t in T])
    gamma = torch.minimum(snr, torch.full_like(snr, 5.0))
    loss = loss * (gamma / (snr + 1) if pred_type == "v_prediction" else gamma / snr)
    s1000 = torch.minimum(snr, torch.ones_like(snr) * 1000)
    scale = s1000 / (s1000 + 1)
    loss = loss * scale
    loss = loss + loss / scale * 0.2
    loss = loss * (1 / (s1000 + 1) if pred_type == "v_prediction" else 1 / torch.sqrt(s1000))
    close(got, loss.mean())
    assert torch.isfinite(got)

    plain = L.step_loss(pred, target, T, sched, table, pred_type, L.LossOptions(), None)
    close(plain, F.mse_loss(pred, target))


def test_zero_terminal_snr_matches_kohyas_rescale():
    base = sd_scheduler()
    betas = base.betas.clone()
    # kohya's enforce_zero_terminal_snr (arXiv 2305.08891, algorithm 1)
    abar_sqrt = (1 - betas).cumprod(0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    want = torch.cumprod(alphas, dim=0)
    got = N.training_scheduler(base.config, "v_prediction", True)
    close(got.alphas_cumprod, want)
    assert float(got.alphas_cumprod[-1]) == 0.0 and got.config.prediction_type == "v_prediction"
    assert torch.equal(N.training_scheduler(base.config, "epsilon").alphas_cumprod, base.alphas_cumprod)


# --- noise and timesteps ---------------------------------------------------------------------------

def test_timesteps_in_min_max_like_kohya():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = N.sample_timesteps(64, 1000, g1, 200, 400)
    assert torch.equal(got, torch.randint(200, 400, (64,), generator=g2))
    assert int(got.min()) >= 200 and int(got.max()) < 400
    assert torch.equal(N.sample_timesteps(3, 1000, g1, 500, 500), torch.full((3,), 500))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(N.sample_timesteps(8, 1000, g1), torch.randint(0, 1000, (8,), generator=g2))


def test_adaptive_and_random_strength_offset_noise_match_kohya():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.7
    opts = N.NoiseOptions(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.1)
    got = N.make_noise(latents.shape, torch.Generator().manual_seed(3), latents=latents, opts=opts)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.rand(1, generator=g) * 0.05
    offset = torch.clamp(offset + 0.1 * torch.abs(latents.mean(dim=(2, 3), keepdim=True)), 0.0, None)
    want = noise + offset * torch.randn((2, 4, 1, 1), generator=g)
    close(got, want)
    # plain offset noise is what it always was (old runs keep their noise)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    old = torch.randn((2, 4, 8, 8), generator=g2)
    old = old + 0.1 * torch.randn((2, 4, 1, 1), generator=g2)
    assert torch.equal(N.make_noise((2, 4, 8, 8), g1, 0.1), old)


def test_multires_noise_matches_kohyas_pyramid():
    opts = N.NoiseOptions(multires_noise_iterations=6, multires_noise_discount=0.3)
    got = N.make_noise((2, 4, 32, 24), torch.Generator().manual_seed(4), opts=opts)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 32, 24, generator=g)
    b, c, w, h = noise.shape
    up = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(6):
        r = float(torch.rand((), generator=g)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += up(torch.randn(b, c, wn, hn, generator=g)) * 0.3**i
        if wn == 1 or hn == 1:
            break
    close(got, noise / noise.std())
    assert abs(float(got.std()) - 1.0) < 1e-4


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_perturbs_the_input_not_the_target(random_strength):
    sched = sd_scheduler()
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ts = torch.tensor([100, 800])
    opts = N.NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength)
    got = N.noisy_latents(sched, lat, noise, ts, torch.Generator().manual_seed(8), opts)
    g = torch.Generator().manual_seed(8)
    strength = torch.rand(1, generator=g) * 0.1 if random_strength else 0.1
    want = sched.add_noise(lat, noise + strength * torch.randn(2, 4, 8, 8, generator=g), ts)
    close(got, want)
    assert not torch.allclose(got, sched.add_noise(lat, noise, ts))
    assert torch.equal(N.noisy_latents(sched, lat, noise, ts, g, N.NoiseOptions()), sched.add_noise(lat, noise, ts))


# --- warmup, spec checks, metadata -----------------------------------------------------------------

def test_fractional_warmup_is_a_share_of_the_steps():
    spec = OptimizerSpec(lr=1.0, scheduler="cosine", warmup_steps=0.1)
    assert spec.resolved_warmup(200) == 20 and OptimizerSpec(warmup_steps=25).resolved_warmup(200) == 25
    assert OptimizerSpec(warmup_steps=10.0).warmup_steps == 10  # a whole float is steps
    with pytest.raises(ValueError, match="fraction below 1"):
        OptimizerSpec(warmup_steps=1.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, _ = build_scheduler(spec, opt, 200)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(0.5) and lrs[20] == pytest.approx(1.0)


def train_spec(**kw):
    return parse_job({"kind": "train", "concepts": [{"image_dir": "x"}], **kw})


def test_spec_validates_the_options():
    spec = train_spec()
    assert spec.huber_schedule == "snr" and spec.loss_type == "l2"  # kohya's defaults
    with pytest.raises(ValueError, match="noise_offset"):
        train_spec(adaptive_noise_scale=0.1)
    with pytest.raises(ValueError, match="min_timestep"):
        train_spec(min_timestep=600, max_timestep=500)
    for bad in ({"max_timestep": 1001}, {"ip_noise_gamma": 2.0}, {"multires_noise_iterations": 0},
                {"huber_schedule": "cosine"}, {"loss_type": "smooth_l2"}):
        with pytest.raises(ValueError):
            train_spec(**bad)
    ok = train_spec(loss_type="smooth_l1", huber_schedule="exponential", min_timestep=100, max_timestep=900,
                    multires_noise_iterations=6, ip_noise_gamma=0.1, zero_terminal_snr=True,
                    debiased_estimation_loss=True, noise_offset=0.05, adaptive_noise_scale=0.01,
                    optimizer={"warmup_steps": 0.05})
    assert ok.optimizer.warmup_steps == 0.05


def test_metadata_records_options_as_kohya_does():
    from trainer.train.outputs import training_metadata

    spec = train_spec(loss_type="huber", multires_noise_iterations=6, ip_noise_gamma=0.1, zero_terminal_snr=True,
                      debiased_estimation_loss=True, min_timestep=100, optimizer={"lr": 2e-4, "warmup_steps": 0.1},
                      network={"train_text_encoder": True})
    md = training_metadata(spec, "sd1", 10, [], "no", False, "epsilon")
    assert md["ss_huber_schedule"] == "snr" and md["ss_huber_c"] == "0.1" and md["ss_huber_scale"] == "1.0"
    assert md["ss_loss_type"] == "huber" and md["ss_multires_noise_iterations"] == "6"
    assert md["ss_multires_noise_discount"] == "0.3" and md["ss_ip_noise_gamma"] == "0.1"
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_debiased_estimation"] == "True"
    assert md["ss_min_timestep"] == "100" and "ss_max_timestep" not in md
    assert md["ss_lr_warmup_steps"] == "0.1"  # kohya records the value as given
    assert md["ss_text_encoder_lr"] == "0.0002"  # trains at the UNet's rate: still recorded
    plain = training_metadata(train_spec(), "sd1", 10, [], "no", False, "epsilon")
    assert plain["ss_zero_terminal_snr"] == "False" and plain["ss_huber_schedule"] == "snr"
    assert "ss_ip_noise_gamma" not in plain and "ss_text_encoder_lr" in plain
