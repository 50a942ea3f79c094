"""The 2-D Gaussian toy (the paper's appendix): its pieces, and the paper's claims on one quick seeded run."""
import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from experiments.toy import ar, diffusion
from experiments.toy.alignment import gradient_moments, preconditioned_cosine
from experiments.toy.experiment import QUICK, ROW_KEYS, ToySettings, run_toy
from experiments.toy.gaussian import fid, frechet_distance_2d, stage_generator, target, training_set

SEED = 0   # quick mode at this seed shows every claim; the report lists how other seeds fare


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run per test session (about 20-30 s on one core), with its files written."""
    from experiments.toy.cli import write_outputs

    out = tmp_path_factory.mktemp("toy")
    result = run_toy(quick=True, seed=SEED, progress=False)
    return result, write_outputs(result, out)


def tiny_settings() -> ToySettings:
    """The quick logic at toy sizes: for checks of plumbing, not of outcomes."""
    d = dataclasses.replace(QUICK.diffusion, base_steps=20, n_synthetic=64, finetune_steps=(2, 3), w=(-1.0, 0.0, 1.0),
                            n_fid=256, cos_zetas=(0.9, 1.1), n_cos_real=256, n_cos_synthetic=256, cos_passes=1)
    a = dataclasses.replace(QUICK.ar, base_epochs=20, n_synthetic=256, finetune_epochs=(2,), w=(-1.0, 0.0, 1.0),
                            n_fid=256, cos_taus=(0.8, 1.2), n_cos_real=256, n_cos_synthetic=256)
    return ToySettings(diffusion=d, ar=a, n_show=16)


def rows(result, model, mode_seeking):
    found = [r for r in result["rows"] if r["model"] == model and r["mode_seeking"] == mode_seeking]
    assert found, f"no {model} rows with mode_seeking={mode_seeking}"
    return found


# ---------------------------------------------------------------- pieces

def test_frechet_distance_2d_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = a @ a.T + 1e-3 * np.eye(2), b @ b.T + 1e-3 * np.eye(2)
        m1, m2 = rng.normal(size=2), rng.normal(size=2)
        ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
        assert frechet_distance_2d(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_fid_of_true_samples_is_near_zero_and_of_shifted_samples_is_the_squared_shift():
    mu, sigma = target()
    assert frechet_distance_2d(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance_2d(mu + [3.0, 4.0], sigma, mu, sigma) == pytest.approx(25.0)
    x = torch.from_numpy(np.random.default_rng(0).multivariate_normal(mu, sigma, 200_000)).float()
    assert fid(x) < 1e-3
    assert fid(torch.full((10, 2), float("nan"))) == math.inf


def test_training_set_is_the_notebooks_numpy_seed_42_draw():
    mu, sigma = target()
    np.random.seed(42)
    expected = np.random.multivariate_normal(mu, sigma, 100).astype(np.float32)
    assert torch.equal(training_set(100, 42), torch.from_numpy(expected))


def test_stage_generators_are_reproducible_and_independent():
    a = torch.randn(4, generator=stage_generator(0, "diffusion", "fid"))
    assert torch.equal(a, torch.randn(4, generator=stage_generator(0, "diffusion", "fid")))
    assert not torch.equal(a, torch.randn(4, generator=stage_generator(1, "diffusion", "fid")))
    assert not torch.equal(a, torch.randn(4, generator=stage_generator(0, "ar", "fid")))


def test_cosine_schedule_starts_at_one_and_alpha_is_the_ratio_of_alpha_bars():
    s = diffusion.cosine_schedule(1000)
    assert s.alpha_bar[0] == 1.0 and bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())
    torch.testing.assert_close(s.alpha[1:], s.alpha_bar[1:] / s.alpha_bar[:-1])


def test_notebook_eta_one_sigma_clamps_to_zero_on_the_sampler_grid():
    """The official "η = 1" sampler is deterministic DDIM: its σ_t formula is ≤ 0 before the clamp."""
    s = diffusion.cosine_schedule(20)
    sigmas = [diffusion.notebook_sigma(float(s.alpha_bar[t]), float(s.alpha_bar[t - 1]), float(s.alpha[t]), 1.0)
              for t in range(1, 20)]
    assert sigmas == [0.0] * 19


def test_diffusion_sampler_depends_on_its_noise_alone_not_on_chunking():
    model = diffusion.EpsMLP().eval()
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    full = diffusion.sample(model, x_T, zeta=1.1, chunk=1000)
    torch.testing.assert_close(diffusion.sample(model, x_T, zeta=1.1, chunk=64), full)
    torch.testing.assert_close(diffusion.sample(model, x_T[:10], zeta=1.1), full[:10])


def test_zeta_one_sampler_matches_plain_ddim():
    """With ζ = 1 the update is deterministic DDIM: x_{t−1} = √ᾱ_{t−1} x̂0 + √(1−ᾱ_{t−1}) ε̂."""
    model = diffusion.EpsMLP().eval()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(2))
    out = diffusion.sample(model, x, zeta=1.0, n_steps=5)
    s = diffusion.cosine_schedule(5)
    with torch.no_grad():
        for t in range(4, 0, -1):
            eps = model(x, torch.full((1, 1), t / 4))
            x0 = (x - (1 - s.alpha_bar[t]).sqrt() * eps) / s.alpha_bar[t].sqrt()
            x = s.alpha_bar[t - 1].sqrt() * x0 + (1 - s.alpha_bar[t - 1]).sqrt() * eps
    torch.testing.assert_close(out, x)


def test_ar_nll_is_the_exact_gaussian_likelihood_and_tau_scales_the_spread():
    torch.manual_seed(3)
    model = ar.ARGaussian2D()
    with torch.no_grad():
        model.mu1.fill_(0.3)
        model.log_std1.fill_(0.2)
    x = torch.randn(64, 2)
    mu2, log_std2 = model.conditional(x[:, 0])
    normal = torch.distributions.Normal
    ref = -(normal(0.3, math.exp(0.2)).log_prob(x[:, 0]) + normal(mu2, log_std2.exp()).log_prob(x[:, 1])).mean()
    torch.testing.assert_close(model.nll(x), ref)
    eps = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(4))
    assert model.sample(eps, tau=0.5)[:, 0].std() == pytest.approx(0.5 * math.exp(0.2), rel=0.03)


def test_preconditioned_cosine_is_a_cosine():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    assert preconditioned_cosine(g, 3 * g, v) == pytest.approx(1.0)
    assert preconditioned_cosine(g, -g, v) == pytest.approx(-1.0)
    p = 1 / (v.sqrt() + 1e-8)
    h = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    ref = (g * p * h).sum() / ((g * p * g).sum() * (h * p * h).sum()).sqrt()
    assert preconditioned_cosine(g, h, v) == pytest.approx(float(ref))


def test_gradient_moments_average_the_batch_gradients_and_bias_correct_v():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    loss = lambda m, xb: -m(xb).mean()          # gradient of a batch = −mean of its rows
    g, v = gradient_moments(model, loss, x, batch=2)
    batch_grads = torch.tensor([[-0.5, -1.0], [-3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(g, batch_grads.mean(0))
    b2 = 0.999
    v_ref = ((1 - b2) * b2 * batch_grads[0] ** 2 + (1 - b2) * batch_grads[1] ** 2) / (1 - b2 ** 2)
    torch.testing.assert_close(v, v_ref)


def test_tiny_run_is_reproduced_by_a_rerun():
    """Same seed, same numbers: best w exactly; FIDs to float32 GEMM rounding (which can vary with memory
    alignment between runs, ~1e-10 here)."""
    a = run_toy(seed=5, progress=False, settings=tiny_settings())
    b = run_toy(seed=5, progress=False, settings=tiny_settings())
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["best_w"] == rb["best_w"] and ra["w"] == rb["w"]
        np.testing.assert_allclose(ra["fid"], rb["fid"], rtol=1e-6)
    for ca, cb in zip(a["cosine"], b["cosine"], strict=True):
        np.testing.assert_allclose(ca["cos"], cb["cos"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a["samples"]["diffusion"]["neon"], b["samples"]["diffusion"]["neon"], rtol=1e-5,
                               atol=1e-6)


def test_cli_writes_results_and_plots(tmp_path, monkeypatch, capsys):
    from experiments.toy import experiment
    from neon import cli

    monkeypatch.setattr(experiment, "QUICK", tiny_settings())
    threads = torch.get_num_threads()
    cli.main(["toy", "--quick", "--out", str(tmp_path / "out"), "--seed", "1", "--threads", "1", "--no-progress"])
    assert torch.get_num_threads() == threads      # the run's thread count does not leak
    printed = capsys.readouterr().out
    assert "best w" in printed and "diffusion" in printed and "ar" in printed
    result = json.loads((tmp_path / "out" / "toy_results.json").read_text())
    assert result["quick"] is True and result["seed"] == 1
    assert len(result["rows"]) == 2 * 2 + 2 * 1   # ζ × snapshots + τ × snapshots
    for name in ("toy_fid_vs_w.png", "toy_cosine.png", "toy_samples.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]   # no temp files left


def test_cli_rejects_bad_threads(tmp_path):
    from neon import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["toy", "--quick", "--threads", "0", "--out", str(tmp_path)])
    assert e.value.code == 2


# ---------------------------------------------------------------- the paper's claims, quick mode

def test_results_json_has_the_promised_rows(quick):
    result, paths = quick
    saved = json.loads(paths[0].read_text())
    assert saved["rows"] == result["rows"]
    assert {(r["model"], r["mode_seeking"]) for r in saved["rows"]} == {
        ("diffusion", True), ("diffusion", False), ("ar", True), ("ar", False)}
    for r in saved["rows"]:
        assert tuple(r) == ROW_KEYS
        assert len(r["w"]) == len(r["fid"]) and r["best_fid"] == min(r["fid"])
        assert r["fid"][r["w"].index(0.0)] == r["base_fid"]      # w = 0 is θr, with the same noise


@pytest.mark.parametrize("model", ["diffusion", "ar"])
def test_mode_seeking_self_training_is_best_undone_with_positive_w(quick, model):
    for r in rows(quick[0], model, mode_seeking=True):
        assert r["best_w"] > 0, r["sampler_param"]
        assert r["best_fid"] < r["base_fid"]


@pytest.mark.parametrize("model", ["diffusion", "ar"])
def test_diversity_seeking_self_training_prefers_negative_w(quick, model):
    for r in rows(quick[0], model, mode_seeking=False):
        assert r["best_w"] < 0, r["sampler_param"]


@pytest.mark.parametrize("model", ["diffusion", "ar"])
def test_gradient_cosine_is_negative_exactly_for_mode_seeking_samplers(quick, model):
    sweep = next(c for c in quick[0]["cosine"] if c["model"] == model)
    mode_seeking = (lambda p: p > 1) if model == "diffusion" else (lambda p: p < 1)
    checked = [(p, c) for p, c in zip(sweep["sampler_param"], sweep["cos"]) if p != 1.0]
    assert any(mode_seeking(p) for p, _ in checked) and not all(mode_seeking(p) for p, _ in checked)
    for p, c in checked:
        assert (c < 0) == mode_seeking(p), (p, c)


# ---------------------------------------------------------------- the figures say what they show

def test_every_fid_panel_colours_a_sampler_kind_alike_and_says_what_w_is(quick):
    from experiments.toy import plots

    result, _ = quick
    fig = plots.fid_curves(result)
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if "seeking" in label:
                colours.setdefault("mode" if "mode-seeking" in label else "diversity", set()).add(line.get_color())
        assert "lower is better" in ax.get_ylabel()
    assert colours == {"mode": {plots.KIND_COLOR["mode-seeking"]}, "diversity": {plots.KIND_COLOR["diversity-seeking"]}}
    assert "(1+w)·θr − w·θs" in fig._suptitle.get_text() and "w = 0 is θr" in fig._suptitle.get_text()


def test_the_cosine_takeaway_is_read_from_the_signs():
    from experiments.toy.plots import cosine_takeaway

    agree = [{"model": "diffusion", "sampler_param": [0.9, 1.0, 1.1], "cos": [0.2, 0.5, -0.1]},
             {"model": "ar", "sampler_param": [0.5, 1.6], "cos": [-0.3, 0.4]}]
    assert cosine_takeaway(agree).startswith("mode-seeking S (red) pulls θ against")   # ζ = 1 is neither kind
    mixed = [{"model": "diffusion", "sampler_param": [0.9, 1.1], "cos": [0.2, 0.1]}]
    assert cosine_takeaway(mixed) == "cos < 0 for 0 of 1 mode-seeking settings, > 0 for 1 of 1 diversity-seeking ones"


def test_the_samples_figure_gives_each_model_its_fid_and_the_true_ellipse(quick):
    from experiments.toy import plots

    result, _ = quick
    fig = plots.samples(result)
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(x.startswith("base θr: FID ") for x in labels) and any(x.startswith("Neon, w=") for x in labels)
        assert "true N(μ, Σ)" in labels
