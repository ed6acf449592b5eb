"""Noise schedule convention (t=0 clean), per-voxel noising, step math, and the PLMS regression proof vs MONAI."""
import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, PNDMScheduler

from spine_ldm.diffusion import NoiseSchedule, ddim_step, ddpm_step, plms_eps, predict_x0, renoise
from spine_ldm.diffusion.samplers import sample_full
from spine_ldm.errors import InputError


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(T=1000, beta_schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)


def make_oracle(sched, x0):
    """Perfect noise predictor for a known x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) per voxel."""
    def fn(x, t_global, t_voxel):
        a = sched.abar(t_voxel, dtype=torch.float64)
        e = (x.double() - a.sqrt() * x0.double()) / (1 - a).clamp_min(1e-30).sqrt()
        return torch.where(t_voxel == 0, torch.zeros_like(e), e).to(x.dtype)
    return fn


def test_abar_convention_matches_monai_shifted(sched):
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    assert float(sched.abar(0)) == 1.0
    ours = sched.abar(torch.arange(1, 1001), dtype=torch.float64)
    np.testing.assert_allclose(ours.numpy(), monai.alphas_cumprod.double().numpy(), rtol=1e-5)
    b = monai.betas.double()
    assert float(sched.abar(2, dtype=torch.float64)) == pytest.approx(float((1 - b[0]) * (1 - b[1])), rel=1e-12)
    # any shape of integer tensors
    t = torch.tensor([[0, 1], [500, 1000]])
    a = sched.abar(t)
    assert a.shape == (2, 2) and a[0, 0] == 1 and bool((a[0, 0] > a[0, 1]) & (a[1, 0] > a[1, 1]))
    lin = NoiseSchedule(beta_schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    assert float(lin.abar(1000)) < float(lin.abar(10)) < 1
    with pytest.raises(InputError, match="0..1000"):
        sched.abar(torch.tensor([1001]))
    with pytest.raises(InputError, match="integers"):
        sched.abar(torch.tensor([1.5]))


def test_timesteps_grid(sched):
    ts = sched.timesteps(50, spacing="trailing")
    assert ts[:3] == [1000, 980, 960] and ts[-2:] == [20, 0] and len(ts) == 51
    ts30 = sched.timesteps(30, spacing="trailing")
    assert ts30[0] == 1000 and ts30[-1] == 0 and len(ts30) == 31
    assert all(a > b for a, b in zip(ts30[:-1], ts30[1:]))
    assert ts30[:4] == [1000, 967, 933, 900]
    assert sched.timesteps(1000, spacing="trailing") == list(range(1000, -1, -1))
    assert sched.timesteps(1000) == list(range(1000, 0, -1)) + [0]
    lead = sched.timesteps(50)  # default: leading (the LDM / MONAI PNDM grid)
    assert lead[:2] == [981, 961] and lead[-3:] == [21, 1, 0] and len(lead) == 51
    with pytest.raises(InputError, match="steps"):
        sched.timesteps(0)


def test_weighted_timesteps_rounding(sched):
    W = torch.tensor([0.0, 0.0004, 0.0005, 0.25, 0.5, 1.0]).reshape(1, 1, 6, 1, 1)
    tv = sched.weighted_timesteps(W, 1000)
    assert tv.flatten().tolist() == [0, 0, 1, 250, 500, 1000]        # 0.5 rounds up (not to even)
    assert sched.weighted_timesteps(torch.full((1, 1, 1, 1, 1), 0.5), 5).item() == 3
    Wb = torch.rand(2, 1, 3, 3, 2)
    tb = sched.weighted_timesteps(Wb, torch.tensor([1000, 10]))
    assert torch.equal(tb[0], torch.floor(Wb[0].double() * 1000 + 0.5).long())
    assert torch.equal(tb[1], torch.floor(Wb[1].double() * 10 + 0.5).long())
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        sched.weighted_timesteps(torch.tensor([1.2]), 10)


def test_add_noise_per_voxel_formula(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, 2, generator=g)
    eps = torch.randn(2, 3, 4, 4, 2, generator=g)
    tv = torch.randint(0, 1001, (2, 1, 4, 4, 2), generator=g)
    tv[0, 0, 0, 0, 0] = 0
    xt = sched.add_noise(x0, eps, tv)
    tab = sched.abar_table
    for idx in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 1), (0, 1, 2, 3, 0)]:
        b, c, i, j, k = idx
        a = float(tab[int(tv[b, 0, i, j, k])])
        ref = np.sqrt(a) * float(x0[idx]) + np.sqrt(1 - a) * float(eps[idx])
        assert float(xt[idx]) == pytest.approx(ref, abs=1e-6)
    full = (tab[tv].sqrt() * x0.double() + (1 - tab[tv]).sqrt() * eps.double()).float()
    assert torch.allclose(xt, full, atol=1e-6)
    # t = 0 -> exactly x0; (B,) timesteps broadcast per sample
    assert torch.equal(sched.add_noise(x0, eps, torch.zeros_like(tv)), x0)
    mask = (tv == 0).expand_as(x0)
    assert torch.equal(xt[mask], x0[mask])
    per_sample = sched.add_noise(x0, eps, torch.tensor([0, 1000]))
    assert torch.equal(per_sample[0], x0[0])
    assert torch.allclose(per_sample[1], sched.add_noise(x0, eps, torch.full_like(tv, 1000))[1])


def test_step_math_identities(sched):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 3, 4, 4, 2, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a_t, a_p = sched.abar(600), sched.abar(580)
    xt = sched.add_noise(x0, eps, 600)
    assert torch.allclose(predict_x0(xt, eps, a_t), x0, atol=1e-4)
    # deterministic DDIM with the true eps lands on the same trajectory
    assert torch.allclose(ddim_step(xt, eps, a_t, a_p), sched.add_noise(x0, eps, 580), atol=1e-5)
    # DDPM ancestral step == DDIM with eta = 1
    assert torch.allclose(ddpm_step(xt, eps, a_t, a_p, noise), ddim_step(xt, eps, a_t, a_p, eta=1.0, noise=noise),
                          atol=1e-5)
    # final step to t=0 returns the x0 prediction, no noise
    assert torch.allclose(ddpm_step(xt, eps, a_t, sched.abar(0), noise), x0, atol=1e-4)
    # re-noising statistics: q(x_t'|x_t) composes with q(x_t|x0)
    big = torch.zeros(200000)
    r = renoise(big + 1.0, sched.abar(100), sched.abar(300), torch.randn(200000, generator=g))
    ratio = float(sched.abar(300, dtype=torch.float64) / sched.abar(100, dtype=torch.float64))
    assert float(r.mean()) == pytest.approx(np.sqrt(ratio), abs=5e-3)
    assert float(r.var()) == pytest.approx(1 - ratio, rel=2e-2)
    # PLMS combinations (constant eps stays constant, coefficients as in the reference)
    e = [torch.full((2,), float(v)) for v in (1, 2, 3, 4)]
    assert torch.equal(plms_eps(e[3], [], e[2]), torch.full((2,), 3.5))
    assert torch.allclose(plms_eps(e[3], [e[2]]), (3 * e[3] - e[2]) / 2)
    assert torch.allclose(plms_eps(e[3], [e[1], e[2]]), (23 * e[3] - 16 * e[2] + 5 * e[1]) / 12)
    assert torch.allclose(plms_eps(e[3], [e[0], e[1], e[2]]), (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0]) / 24)
    for hist in ([e[0]], [e[0]] * 2, [e[0]] * 3, [e[0]] * 5):
        assert torch.allclose(plms_eps(e[0], hist), e[0])
    with pytest.raises(ValueError, match="e_next"):
        plms_eps(e[0], [])


def _monai_plms(oracle, x_T, steps=50, set_alpha_to_one=False, repeat_second=False, dtype=torch.float32):
    """Run MONAI's PNDMScheduler(skip_prk_steps=True) with a noise predictor in our timestep convention."""
    m = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, schedule="scaled_linear_beta",
                      beta_start=0.0015, beta_end=0.0195, set_alpha_to_one=set_alpha_to_one)
    m.alphas_cumprod = m.alphas_cumprod.to(dtype)
    m.set_timesteps(steps)
    ts = [int(t) for t in m.timesteps]
    if repeat_second:   # what diffusers' PNDMScheduler does for skip_prk_steps: evaluate the 2nd timestep twice
        ts = ts[:2] + ts[1:]
    x = x_T.clone()
    for t in ts:
        tv = torch.full((x.shape[0], 1, *x.shape[2:]), t + 1)   # MONAI index k == our t = k + 1
        x, _ = m.step(oracle(x, None, tv), t, x)
    return x, len(ts)


def test_plms_oracle_fixes_monai_regression(sched):
    """Regression proof (perfect x0 oracle): MONAI 1.6.1 PNDMScheduler(skip_prk_steps=True) as shipped ends at
    alphas_cumprod[0] (our t = 1, not clean), so even a perfect noise predictor leaves noise; ours recovers x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8, 4, generator=g)
    x_T = torch.randn(x0.shape, generator=g)
    oracle = make_oracle(sched, x0)
    errs = {}
    for spacing in ("trailing", "leading"):
        ours, info = sample_full(oracle, x0.shape, steps=50, sampler="plms", x_T=x_T, schedule=sched, spacing=spacing)
        assert info["nfe"] == 51
        errs[spacing] = float((ours - x0).abs().max())
    monai_x, monai_calls = _monai_plms(oracle, x_T)
    err_monai = float((monai_x - x0).abs().max())
    assert monai_calls == 50
    assert max(errs.values()) < 1e-3, errs
    assert err_monai > 0.05 and err_monai > 100 * max(errs.values()), (err_monai, errs)


def test_plms_matches_reference_and_monai_drops_a_timestep(sched):
    """Exact-score test: data x0 ~ N(mu, sd^2) per voxel has the analytic noise predictor
    eps(x, t) = sqrt(1 - a) (x - sqrt(a) mu) / (a sd^2 + 1 - a) and the probability-flow ODE maps x_T to
    mu + sd (x_T - sqrt(a_T) mu) / sqrt(a_T sd^2 + 1 - a_T). On the same (leading) grid our PLMS equals the reference
    PLMS (MONAI's step math fed the timestep sequence diffusers uses, second timestep repeated) to 1e-6, while MONAI's
    own skip_prk_steps sequence (50 calls, the warm-up eats a timestep so x at t=961 is evaluated as t=941) is ~10x
    less accurate. DDIM (first order) is much worse than PLMS at the same step count."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 3, 8, 8, 4, generator=g).double()
    sd = 0.5 + torch.rand(1, 3, 8, 8, 4, generator=g).double()
    x_T = torch.randn(2, 3, 8, 8, 4, generator=g).double()

    def oracle(x, t_global, t_voxel):
        a = sched.abar(t_voxel, dtype=torch.float64)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sd ** 2 + 1 - a)

    a_T = sched.abar(981, dtype=torch.float64)
    exact = mu + sd * (x_T - a_T.sqrt() * mu) / (a_T * sd ** 2 + 1 - a_T).sqrt()
    kw = dict(steps=50, x_T=x_T, dtype=torch.float64, schedule=sched, spacing="leading")
    ours, info = sample_full(oracle, x_T.shape, sampler="plms", **kw)
    ddim, _ = sample_full(oracle, x_T.shape, sampler="ddim", **kw)
    ref, n_ref = _monai_plms(oracle, x_T, set_alpha_to_one=True, repeat_second=True, dtype=torch.float64)
    shipped, n_shipped = _monai_plms(oracle, x_T, set_alpha_to_one=True, dtype=torch.float64)
    assert info["nfe"] == n_ref == 51 and n_shipped == 50
    assert float((ours - ref).abs().max()) < 1e-6
    err = {k: float((v - exact).abs().max()) for k, v in
           {"ours": ours, "shipped": shipped, "ddim": ddim}.items()}
    assert err["ours"] < 3e-3, err
    assert err["shipped"] > 5 * err["ours"], err
    assert err["ddim"] > 20 * err["ours"], err
