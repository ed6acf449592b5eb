"""Inpainting samplers (oracle accuracy, nfe, bit-identity, reproducibility, cancel/progress) and training losses."""
import pytest
import torch

from spine_ldm.diffusion import (NoiseSchedule, diffusion_loss, expected_nfe, sample_full, sample_masked,
                                 sample_repaint, sample_weighted, unet_model_fn)
from spine_ldm.errors import CancelledError, InputError

SHAPE = (2, 3, 8, 8, 4)


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule()


@pytest.fixture
def x0():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def make_oracle(sched, x0):
    def fn(x, t_global, t_voxel):
        assert t_global.shape == (x.shape[0],) and t_voxel.shape == (x.shape[0], 1, *x.shape[2:])
        a = sched.abar(t_voxel, dtype=torch.float64)
        e = (x.double() - a.sqrt() * x0.double()) / (1 - a).clamp_min(1e-30).sqrt()
        return torch.where(t_voxel == 0, torch.zeros_like(e), e).to(x.dtype)
    return fn


def toy_model(x, t_global, t_voxel):
    """A deterministic, imperfect noise predictor: outputs depend on the sampler's noise."""
    return 0.5 * torch.tanh(x) + 1e-4 * t_voxel.to(x.dtype)


def smooth_weight(shape=SHAPE, peak=(4, 4, 2), sigma=2.0):
    sp = shape[2:]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in sp], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, peak))
    W = torch.exp(-d2 / (2 * sigma ** 2))
    return W.reshape(1, 1, *sp).expand(shape[0], 1, *sp).clone()


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
def test_weighted_oracle_and_bit_identity(sched, x0, sampler):
    W = smooth_weight()
    W[:, :, 0, 0, 0] = 0.0
    W[:, :, 0, 0, 1] = 0.0004           # rounds to t_v = 0 at T = 1000
    out, info = sample_weighted(make_oracle(sched, x0), x0, W, steps=50, sampler=sampler, generator=1,
                                schedule=sched)
    assert info["nfe"] == (51 if sampler == "plms" else 50) == expected_nfe(sampler, 50)
    assert info["method"] == "weighted" and info["timesteps"][0] == 981
    assert float((out - x0).abs().max()) < 1e-3
    zero = (sched.weighted_timesteps(W, 1000) == 0).expand_as(x0)
    assert zero.sum() >= 2 * 3 * 2 and torch.equal(out[zero], x0[zero])
    # with an imperfect model too: W = 0 voxels are bit-identical, the others change
    out2, _ = sample_weighted(toy_model, x0, W, steps=10, sampler=sampler, generator=2, schedule=sched)
    assert torch.equal(out2[zero], x0[zero])
    assert (out2[~zero] - x0[~zero]).abs().max() > 1e-2


def test_weighted_stalled_voxels_keep_value_exactly(sched, x0):
    """Voxels with W = 0.001 start at t_v = round(0.98) = 1 and stay at t_v = 1 (never 0 while t >= 1: every noised
    voxel ends with the grid's own last step 1 -> 0): they must not change, bit for bit, before that step and
    do change in it. Voxels with W = 0.0004 (t_v = 0 from the start) never change."""
    W = torch.full((2, 1, 8, 8, 4), 0.001)
    W[:, :, 5, 5, 2] = 1.0
    W[:, :, 7] = 0.0004
    seen = []

    def rec(x, tg, tv):
        seen.append((int(tg[0]), x.clone(), tv.clone()))
        return toy_model(x, tg, tv)

    for sampler in ("ddim", "plms"):
        seen.clear()
        out, info = sample_weighted(rec, x0, W, steps=50, sampler=sampler, generator=0, schedule=sched)
        assert info["timesteps"][-2:] == [1, 0]
        low = (slice(None), slice(None), slice(0, 4))
        assert all(bool((tv[low] == 1).all()) and bool((tv[:, :, 7] == 0).all()) for _, _, tv in seen)
        before = [x[low] for _, x, _ in seen]
        assert len(before) >= 50 and all(torch.equal(b, before[0]) for b in before)   # 2*3*4*8*4 voxels
        assert not torch.equal(out[low], before[0])                                    # ... and move in the last
        assert torch.equal(out[:, :, 7], x0[:, :, 7])


def test_weighted_reproducible_and_seed_dependent(sched, x0):
    W = smooth_weight()
    a, _ = sample_weighted(toy_model, x0, W, steps=8, generator=torch.Generator().manual_seed(5), schedule=sched)
    b, _ = sample_weighted(toy_model, x0, W, steps=8, generator=torch.Generator().manual_seed(5), schedule=sched)
    c, _ = sample_weighted(toy_model, x0, W, steps=8, generator=torch.Generator().manual_seed(6), schedule=sched)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    d, _ = sample_weighted(toy_model, x0, W, steps=8, generator=5, schedule=sched)   # int seed == Generator seed
    assert torch.equal(a, d)
    # per-sample generators: each batch element equals the same seed run alone
    e, _ = sample_weighted(toy_model, x0, W, steps=8, generator=[7, torch.Generator().manual_seed(8)], schedule=sched)
    for k, seed in enumerate((7, 8)):
        single, _ = sample_weighted(toy_model, x0[k:k + 1], W[k:k + 1], steps=8, generator=seed, schedule=sched)
        assert torch.equal(e[k:k + 1], single)
    r, _ = sample_repaint(toy_model, x0, W > 0.3, steps=6, jump_length=2, jump_n_sample=2, generator=[7, 8],
                          schedule=sched)
    r1, _ = sample_repaint(toy_model, x0[1:], W[1:] > 0.3, steps=6, jump_length=2, jump_n_sample=2, generator=8,
                           schedule=sched)
    assert torch.equal(r[1:], r1)
    with pytest.raises(InputError, match="3 generators for a batch of 2"):
        sample_weighted(toy_model, x0, W, steps=2, generator=[1, 2, 3], schedule=sched)
    with pytest.raises(InputError, match="generator must be"):
        sample_weighted(toy_model, x0, W, steps=2, generator="seed", schedule=sched)


def test_masked_sampler(sched, x0):
    roi = smooth_weight() > 0.1
    out, info = sample_masked(make_oracle(sched, x0), x0, roi, steps=50, generator=0, schedule=sched)
    assert info["method"] == "masked" and info["nfe"] == 51
    assert float((out - x0).abs().max()) < 1e-3
    outside = (~roi).expand_as(x0)
    out2, _ = sample_masked(toy_model, x0, roi.float(), steps=5, generator=0, schedule=sched)
    assert torch.equal(out2[outside], x0[outside])
    assert (out2[~outside] - x0[~outside]).abs().max() > 1e-2
    # the masked sampler is the weighted sampler with W := roi
    ref, _ = sample_weighted(toy_model, x0, roi.float(), steps=5, generator=0, schedule=sched)
    assert torch.equal(out2, ref)
    with pytest.raises(InputError, match="boolean"):
        sample_masked(toy_model, x0, smooth_weight(), steps=5, schedule=sched)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_repaint_oracle_nfe_and_outside(sched, x0, sampler):
    roi = smooth_weight() > 0.3
    out, info = sample_repaint(make_oracle(sched, x0), x0, roi, steps=50, jump_length=10, jump_n_sample=10,
                               sampler=sampler, generator=0, schedule=sched)
    assert info["nfe"] == 410 == 50 + 9 * 10 * 4 == expected_nfe("ddpm", 50, 10, 10, repaint=True)
    assert float((out - x0).abs().max()) < 1e-3
    outside = (~roi).expand_as(x0)
    out2, info2 = sample_repaint(toy_model, x0, roi, steps=20, jump_length=5, jump_n_sample=2, sampler=sampler,
                                 generator=0, schedule=sched)
    assert info2["nfe"] == 20 + 1 * 5 * 3
    assert torch.equal(out2[outside], x0[outside])
    assert (out2[~outside] - x0[~outside]).abs().max() > 1e-2
    _, info3 = sample_repaint(toy_model, x0, roi, steps=12, jump_n_sample=1, generator=0, schedule=sched)
    assert info3["nfe"] == 12


def test_repaint_reproducible(sched, x0):
    roi = smooth_weight() > 0.3
    kw = dict(steps=10, jump_length=3, jump_n_sample=2, schedule=sched)
    a, _ = sample_repaint(toy_model, x0, roi, generator=3, **kw)
    b, _ = sample_repaint(toy_model, x0, roi, generator=3, **kw)
    c, _ = sample_repaint(toy_model, x0, roi, generator=4, **kw)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ["plms", "ddim"])
def test_full_oracle(sched, x0, sampler):
    out, info = sample_full(make_oracle(sched, x0), SHAPE, steps=50, sampler=sampler, generator=0, schedule=sched)
    assert float((out - x0).abs().max()) < 1e-3 and info["method"] == "full"
    assert info["nfe"] == (51 if sampler == "plms" else 50)
    _, info1 = sample_full(toy_model, SHAPE, steps=1, sampler="plms", generator=0, schedule=sched)
    assert info1["nfe"] == 1


def test_ddim_eta_is_stochastic(sched, x0):
    W = smooth_weight()
    a, _ = sample_weighted(toy_model, x0, W, steps=6, sampler="ddim", eta=1.0, generator=1, schedule=sched)
    b, _ = sample_weighted(toy_model, x0, W, steps=6, sampler="ddim", eta=0.0, generator=1, schedule=sched)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(InputError, match="eta"):
        sample_weighted(toy_model, x0, W, steps=6, sampler="plms", eta=1.0, schedule=sched)


def test_progress_and_cancel(sched, x0):
    calls = []
    sample_weighted(toy_model, x0, smooth_weight(), steps=5, progress=lambda s, n: calls.append((s, n)),
                    schedule=sched)
    assert calls == [(i, 6) for i in range(1, 7)]
    calls.clear()
    with pytest.raises(CancelledError, match="step 3 of 50"):
        sample_weighted(toy_model, x0, smooth_weight(), steps=50, sampler="ddim",
                        progress=lambda s, n: calls.append(s), cancel=lambda: len(calls) >= 3, schedule=sched)
    assert len(calls) == 3
    with pytest.raises(CancelledError):
        sample_repaint(toy_model, x0, smooth_weight() > 0.5, steps=10, cancel=lambda: True, schedule=sched)
    with pytest.raises(CancelledError):
        sample_full(toy_model, SHAPE, steps=10, cancel=lambda: True, schedule=sched)


def test_sampler_input_errors(sched, x0):
    with pytest.raises(InputError, match="sampler"):
        sample_weighted(toy_model, x0, smooth_weight(), sampler="euler", schedule=sched)
    with pytest.raises(InputError, match="steps"):
        sample_weighted(toy_model, x0, smooth_weight(), steps=0, schedule=sched)
    with pytest.raises(InputError, match="W must have shape"):
        sample_weighted(toy_model, x0, torch.ones(1, 1, 8, 8, 5), schedule=sched)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        sample_weighted(toy_model, x0, smooth_weight() * 2, schedule=sched)
    with pytest.raises(InputError, match="noise predictor returned"):
        sample_weighted(lambda x, t, tv: x[:, :1], x0, smooth_weight(), steps=2, schedule=sched)
    # a spatial-only W is accepted and broadcast over the batch
    a, _ = sample_weighted(toy_model, x0, smooth_weight()[0, 0], steps=3, generator=0, schedule=sched)
    b, _ = sample_weighted(toy_model, x0, smooth_weight(), steps=3, generator=0, schedule=sched)
    assert torch.equal(a, b)


def test_samplers_with_small_unet(sched):
    from spine_ldm.models import build_unet, load_config
    cfg = load_config("small", **{"unet.w_channel": True})
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    z0 = torch.randn(2, *cfg.latent_shape)
    W = smooth_weight((2, 3, *cfg.latent_shape[1:]), peak=(8, 4, 8), sigma=2.0)
    fn = unet_model_fn(unet, torch.tensor([3, 4]), torch.tensor([2, 2]), w=W)
    with torch.no_grad():
        out, info = sample_weighted(fn, z0, W, steps=3, generator=0, schedule=sched)
    zero = (sched.weighted_timesteps(W, 1000) == 0).expand_as(z0)
    assert out.shape == z0.shape and info["nfe"] == 4
    assert zero.any() and torch.equal(out[zero], z0[zero])
    with pytest.raises(InputError, match="W input channel"):
        unet_model_fn(unet, 0, 0)


class _CondEcho(torch.nn.Module):
    """eps = x * (1 + condition index) + w: records the batch size and condition indices of every call."""
    w_channel = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, level_idx, cond_idx, w=None):
        cond_idx = torch.as_tensor(cond_idx).reshape(-1).expand(x.shape[0])
        self.calls.append((x.shape[0], cond_idx.tolist(), torch.as_tensor(t).reshape(-1).tolist(), w.shape[0]))
        return x * (1.0 + cond_idx.float().view(-1, 1, 1, 1, 1)) + w


def test_guidance_combines_conditional_and_healthy_in_one_doubled_call():
    net = _CondEcho()
    x = torch.randn(2, 3, 4, 4, 4)
    w = torch.rand(1, 1, 4, 4, 4)
    t = torch.tensor([500, 500])
    plain = unet_model_fn(net, 3, 2, w=w)(x, t, None)
    assert net.calls == [(2, [2, 2], [500, 500], 1)]
    assert torch.allclose(plain, x * 3.0 + w)
    net.calls.clear()
    g = unet_model_fn(net, 3, 2, w=w, guidance_scale=2.5, null_cond_idx=0)(x, t, None)
    assert net.calls == [(4, [2, 2, 0, 0], [500] * 4, 4)]  # one call on the doubled batch, healthy half last
    e_cond, e_null = x * 3.0 + w, x * 1.0 + w
    assert torch.allclose(g, e_null + 2.5 * (e_cond - e_null))
    assert torch.allclose(unet_model_fn(net, 3, 2, w=w, guidance_scale=0.0)(x, t, None), e_null)
    for bad in (-1.0, 25.0, float("nan")):
        with pytest.raises(InputError, match="guidance scale must be between 0 and 20"):
            unet_model_fn(net, 3, 2, w=w, guidance_scale=bad)


# ------------------------------------------------------------------------------------------------ losses
class TinyEps(torch.nn.Module):
    """Per-voxel linear noise predictor with a timestep input: enough to learn eps for a fixed z0."""

    def __init__(self, shape):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(shape[1:]))
        self.b = torch.nn.Parameter(torch.zeros(shape[1:]))
        self.c = torch.nn.Parameter(torch.zeros(shape[1:]))

    def forward(self, x, t, tv):
        s = tv.to(x.dtype) / 1000.0
        return self.a * x + self.b + self.c * s * x


@pytest.mark.parametrize("method", ["weighted", "masked", "full"])
def test_loss_decreases(sched, x0, method):
    torch.manual_seed(0)
    net = TinyEps(SHAPE)
    W = smooth_weight(sigma=3.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)

    def eval_loss():
        with torch.no_grad():
            return float(sum(diffusion_loss(net, x0, W, method, sched, torch.Generator().manual_seed(100 + k))
                             for k in range(20)) / 20)

    before = eval_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss = diffusion_loss(net, x0, W, method, sched, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_masked_loss_ignores_outside_roi(sched, x0):
    W = smooth_weight()
    roi = W > 0.1
    pred_scale = torch.nn.Parameter(torch.ones(SHAPE))
    seen = {}

    def fn(x, t, tv):
        seen["x"], seen["tv"] = x, tv
        return x * pred_scale

    loss, info = diffusion_loss(fn, x0, W, "masked", sched, torch.Generator().manual_seed(0), return_info=True)
    loss.backward()
    outside = (~roi).expand_as(x0)
    assert torch.equal(pred_scale.grad[outside], torch.zeros(int(outside.sum())))
    assert pred_scale.grad[~outside].abs().min() > 0
    assert torch.equal(seen["x"][outside], x0[outside])           # not noised outside
    assert bool((seen["tv"][~roi] == 0).all()) and bool((seen["tv"][roi] == info["t"].reshape(2, 1, 1, 1)[
        torch.nonzero(roi)[:, 0]].flatten()).all())
    # bool masks are accepted as W
    loss_b = diffusion_loss(fn, x0, roi, "masked", sched, torch.Generator().manual_seed(0))
    assert torch.allclose(loss_b, loss)


def test_weighted_loss_excludes_unnoised_voxels(sched, x0):
    W = smooth_weight(sigma=1.0)
    pred_scale = torch.nn.Parameter(torch.ones(SHAPE))
    t = torch.tensor([40, 1000])
    loss, info = diffusion_loss(lambda x, tg, tv: x * pred_scale, x0, W, "weighted", sched, torch.Generator(),
                                t=t, return_info=True)
    loss.backward()
    tv = info["t_voxel"]
    assert torch.equal(tv, sched.weighted_timesteps(W, t))
    zero = (tv == 0).expand_as(x0)
    assert zero.any() and (~zero).any()
    assert torch.equal(pred_scale.grad[zero], torch.zeros(int(zero.sum())))
    assert pred_scale.grad[~zero].abs().min() > 0
    m = (~zero).float()
    ref = ((info["x_t"] - info["eps"]) ** 2 * m).sum() / m.sum()
    assert torch.allclose(loss, ref)
    assert 0 < info["included_fraction"] < 1
    # full: every voxel counts, the U-Net is told the global t
    lf, inf = diffusion_loss(lambda x, tg, tv: x, x0, None, "full", sched, torch.Generator().manual_seed(0),
                             return_info=True)
    assert inf["included_fraction"] == 1.0 and bool((inf["t_voxel"] == inf["t"].reshape(2, 1, 1, 1, 1)).all())
    assert 1 <= int(inf["t"].min()) and int(inf["t"].max()) <= 1000


def test_snr_gamma_weights_voxels_by_min_snr(sched, x0):
    """snr_gamma g: each included voxel also counts min(SNR_v, g) / SNR_v, SNR_v = abar(t_v) / (1 - abar(t_v)), so
    barely noised voxels weigh less; combined with roi_loss_weight multiplicatively; 0 = off; negative = error."""
    W = smooth_weight(sigma=1.5)
    t = torch.tensor([30, 800])
    for method in ("weighted", "full"):
        Wm = None if method == "full" else W
        l0, info = diffusion_loss(lambda x, tg, tv: x * 0.5, x0, Wm, method, sched, torch.Generator(), t=t,
                                  return_info=True)
        l5 = diffusion_loss(lambda x, tg, tv: x * 0.5, x0, Wm, method, sched, torch.Generator(), t=t, snr_gamma=5.0,
                            roi_loss_weight=2.0)
        tv = info["t_voxel"]
        a = sched.abar(tv, dtype=torch.float64).clamp(max=1 - 1e-12)
        snr = a / (1 - a)
        w = (tv > 0).double() * (snr.clamp(max=5.0) / snr)
        if method != "full":
            w = w * (1 + 2.0 * W.double())
        w = w.expand_as(x0)
        err = ((info["x_t"] * 0.5 - info["eps"]) ** 2).double()
        assert torch.allclose(l5.double(), (err * w).sum() / w.sum(), rtol=1e-5)
        assert not torch.allclose(l0, l5)
        # t = 800 (SNR < 5) keeps full weight, t = 30 (SNR ~ 24) is down-weighted
        assert float(w[1].max()) > float(w[0].max()) * 3
    with pytest.raises(InputError, match="snr_gamma"):
        diffusion_loss(toy_model, x0, W, "weighted", sched, snr_gamma=-1)


def test_roi_loss_weight_weights_voxels_by_W(sched, x0):
    """roi_loss_weight r: each included voxel counts 1 + r W_v (weighted and masked); 0 is the plain mean."""
    W = smooth_weight(sigma=1.0)
    t = torch.tensor([40, 1000])
    for method in ("weighted", "masked"):
        l0, info = diffusion_loss(lambda x, tg, tv: x * 0.5, x0, W, method, sched, torch.Generator(), t=t,
                                  return_info=True)
        l3 = diffusion_loss(lambda x, tg, tv: x * 0.5, x0, W, method, sched, torch.Generator(), t=t,
                            roi_loss_weight=3.0)
        inc = (info["t_voxel"] > 0).float().expand_as(x0)
        err = (info["x_t"] * 0.5 - info["eps"]) ** 2
        w = inc * (1 + 3.0 * W.expand(2, 1, *W.shape[-3:]).expand_as(x0))
        assert torch.allclose(l0, (err * inc).sum() / inc.sum())
        assert torch.allclose(l3, (err * w).sum() / w.sum())
        assert not torch.allclose(l0, l3)
    # full ignores it (no W); a negative weight is an error
    lf = diffusion_loss(lambda x, tg, tv: x, x0, None, "full", sched, torch.Generator().manual_seed(0),
                        roi_loss_weight=3.0)
    lf0 = diffusion_loss(lambda x, tg, tv: x, x0, None, "full", sched, torch.Generator().manual_seed(0))
    assert torch.equal(lf, lf0)
    with pytest.raises(InputError, match="roi_loss_weight"):
        diffusion_loss(toy_model, x0, W, "weighted", sched, roi_loss_weight=-1)


def test_loss_errors(sched, x0):
    with pytest.raises(InputError, match="method"):
        diffusion_loss(toy_model, x0, None, "repaint", sched)
    with pytest.raises(InputError, match="needs a weight"):
        diffusion_loss(toy_model, x0, None, "weighted", sched)
    with pytest.raises(InputError, match="W must have shape"):
        diffusion_loss(toy_model, x0, torch.ones(3, 3), "masked", sched)


def _gaussian_data(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, *shape[1:], generator=g).double()
    sd = 0.5 + torch.rand(1, *shape[1:], generator=g).double()
    return mu, sd


def _exact_weighted(sched, mu, sd, z0, W, seed, spacing, steps=50):
    """The exact endpoint of the per-voxel probability-flow ODE: the weighted sampler starts voxel v at
    x_v = add_noise(z0_v, eps_v, round(W_v t_0)) (eps = the generator's first draw) and, with the exact score of
    per-voxel Gaussian data N(mu_v, sd_v^2), must end at mu + sd (x - sqrt(a) mu) / sqrt(a sd^2 + 1 - a)."""
    t0 = sched.timesteps(steps, spacing)[0]
    tv = sched.weighted_timesteps(W, t0)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    x = sched.add_noise(z0, eps, tv)
    a = sched.abar(tv, dtype=torch.float64)
    return torch.where(tv == 0, z0, mu + sd * (x - a.sqrt() * mu) / (a * sd ** 2 + 1 - a).sqrt())


def test_weighted_plms_exact_score_per_voxel(sched, monkeypatch):
    """Exact-score oracle with per-voxel noise levels (issue #13): every voxel follows its own grid
    round(W_v t_i). On the leading grid (the model configs' default) PLMS-50 lands within 6e-3 of the exact ODE
    endpoint everywhere (DDIM: ~0.15; before the per-voxel history and the final 1 -> 0 step for every noised
    voxel it was 0.023 at W ~ 0.5), and the trailing grid is clearly worse at W = 1. The oracle catches a broken
    multistep formula (using the oldest eps instead of the Adams-Bashforth combination), which the delta-x0 oracle
    above does not."""
    from spine_ldm.diffusion import samplers as S

    mu, sd = _gaussian_data()
    z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).double()
    W = smooth_weight(sigma=2.5).double()
    W[:, :, 4, 4, 2] = 1.0

    def oracle(x, t_global, t_voxel):
        a = sched.abar(t_voxel, dtype=torch.float64)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sd ** 2 + 1 - a)

    err = {}
    for spacing in ("leading", "trailing"):
        out, info = sample_weighted(oracle, z0, W, steps=50, generator=7, schedule=sched, spacing=spacing)
        assert info["nfe"] == 51
        diff = (out - _exact_weighted(sched, mu, sd, z0, W, 7, spacing)).abs()
        err[spacing] = (float(diff.max()), float(diff[(W == 1).expand_as(diff)].max()))
    assert err["leading"][0] < 6e-3, err
    assert err["trailing"][1] > 5 * err["leading"][1], err
    ddim, _ = sample_weighted(oracle, z0, W, steps=50, sampler="ddim", generator=7, schedule=sched, spacing="leading")
    assert float((ddim - _exact_weighted(sched, mu, sd, z0, W, 7, "leading")).abs().max()) > 10 * err["leading"][0]

    def oldest_eps(e_t, old_eps, e_next=None):
        return (e_t + e_next) / 2 if not old_eps else old_eps[0]

    monkeypatch.setattr(S, "plms_eps", oldest_eps)
    bad, _ = sample_weighted(oracle, z0, W, steps=50, generator=7, schedule=sched, spacing="leading")
    assert float((bad - _exact_weighted(sched, mu, sd, z0, W, 7, "leading")).abs().max()) > 10 * err["leading"][0]
