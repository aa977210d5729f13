"""ALR (trpr/modeling/alr.py): the weight formula, the consensus, noise separation on planted losses, the
mixture's settings and its degenerate-fit rules."""
import math

import pytest
import torch

from trpr.modeling.alr import (FIT_CONSTANT_LOSSES, FIT_FAILED, FIT_OK, FIT_ONE_SIDED, AlrResult, MixtureSettings,
                          compute_alr, fit_mixture, noise_detection_scores)


def _two_clusters(clean_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Losses [N]: about 0.5 for clean samples, about 3.0 for noisy ones (tight, well separated)."""
    noise = 0.05 * torch.randn(clean_mask.numel(), generator=generator, dtype=torch.float64)
    return torch.where(clean_mask, 0.5 + noise, 3.0 + noise)


def test_consensus_threshold_weights_and_keep_on_planted_groups():
    generator = torch.Generator().manual_seed(0)
    n = 100
    index = torch.arange(n)
    clean_a = index < 60                     # groups: [0,40) both clean, [40,60) only A,
    clean_b = (index < 40) | ((index >= 60) & (index < 80))  # [60,80) only B, [80,100) neither
    sims = torch.linspace(0.9, -0.1, n, dtype=torch.float64)
    result = compute_alr(_two_clusters(clean_a, generator), _two_clusters(clean_b, generator), sims,
                         mu="min", sharpness=5.0, drop_noisy=True)
    assert isinstance(result, AlrResult)
    expected_consensus = clean_a.long() + clean_b.long()
    assert torch.equal(result.consensus, expected_consensus)
    # mu = min similarity over the super-clean set (samples 0..39, descending sims -> sample 39)
    assert result.mu == pytest.approx(float(sims[39]))
    assert torch.equal(result.keep, expected_consensus >= 1)
    # formula: 1 at or above mu, sigmoid(kappa * s / mu) below it
    expected = torch.where(sims >= sims[39], torch.ones_like(sims), torch.sigmoid(5.0 * sims / sims[39]))
    assert torch.allclose(result.weights.double(), expected, atol=1e-6)
    assert result.weights.dtype == torch.float32
    assert torch.all(result.weights[:40] == 1.0)
    assert torch.all(result.weights[40:] < 1.0)
    assert (result.p_clean_a[:60] > 0.5).all() and (result.p_clean_a[60:] < 0.5).all()


def test_weight_formula_single_value():
    # sims: sample 0 and 1 super-clean (losses low for both), mu = min(0.8, 0.6) = 0.6
    losses = torch.tensor([0.1, 0.1, 5.0, 5.0, 5.1, 0.11])
    sims = torch.tensor([0.8, 0.6, 0.3, -0.3, 0.9, 0.6])
    result = compute_alr(losses, losses.clone(), sims, mu="min", sharpness=3.0)
    assert result.mu == pytest.approx(0.6)
    assert result.weights[2].item() == pytest.approx(1 / (1 + math.exp(-3.0 * 0.3 / 0.6)), rel=1e-6)
    assert result.weights[3].item() == pytest.approx(1 / (1 + math.exp(3.0 * 0.3 / 0.6)), rel=1e-6)
    assert result.weights[4].item() == 1.0  # noisy by loss but above mu: full weight
    assert result.keep.all()  # soft weighting by default


def test_mu_rules_mean_and_quantile():
    losses = torch.tensor([0.1, 0.12, 0.11, 0.13, 4.0, 4.1])
    sims = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.1, 0.0])
    assert compute_alr(losses, losses, sims, mu="mean").mu == pytest.approx(0.5)
    assert compute_alr(losses, losses, sims, mu="q0.5").mu == pytest.approx(0.5)
    assert compute_alr(losses, losses, sims, mu=1.0).mu == pytest.approx(0.8)
    with pytest.raises(ValueError, match="mu"):
        compute_alr(losses, losses, sims, mu="median")
    with pytest.raises(ValueError, match="level"):
        compute_alr(losses, losses, sims, mu="q1.5")


def test_empty_super_clean_falls_back_to_highest_consensus():
    index = torch.arange(40)
    clean_a = index < 20
    clean_b = index >= 20  # disjoint: nobody is clean for both -> C = samples with c == 1 (all)
    generator = torch.Generator().manual_seed(1)
    sims = torch.linspace(0.5, 0.9, 40)
    result = compute_alr(_two_clusters(clean_a, generator), _two_clusters(clean_b, generator), sims)
    assert int(result.consensus.max()) == 1
    assert result.mu == pytest.approx(0.5)
    assert torch.all(result.weights == 1.0)


def test_one_model_alr_uses_model_a_clean_set():
    generator = torch.Generator().manual_seed(2)
    clean = torch.arange(30) < 18
    result = compute_alr(_two_clusters(clean, generator), None, torch.rand(30, generator=generator),
                         drop_noisy=True)
    assert result.p_clean_b is None
    assert torch.equal(result.consensus, 2 * clean.long())
    assert torch.equal(result.keep, clean)


def test_constant_losses_are_all_clean():
    fit = fit_mixture(torch.full((10,), 2.5))
    assert fit.status == FIT_CONSTANT_LOSSES and torch.all(fit.p_clean == 1.0)
    assert fit.record()["clean_fraction"] == 1.0 and "every sample clean" in fit.record()["rule"]


def _skewed_losses() -> torch.Tensor:
    """180 low losses, 20 high ones: a clear split under the default settings."""
    generator = torch.Generator().manual_seed(0)
    return torch.cat([0.1 * torch.rand(180, generator=generator, dtype=torch.float64),
                      0.9 + 0.1 * torch.rand(20, generator=generator, dtype=torch.float64)])


def test_mixture_settings_reach_the_fit():
    losses = _skewed_losses()
    fit = fit_mixture(losses)
    assert fit.status == FIT_OK and fit.converged and fit.record()["clean_fraction"] == pytest.approx(0.9)
    assert fit.means[0] < fit.means[1] and fit.weights == pytest.approx([0.9, 0.1], abs=1e-6)
    planted = _two_clusters(torch.arange(300) < 200, torch.Generator().manual_seed(5))
    short = fit_mixture(planted, MixtureSettings(max_iter=1, tol=1e-12))
    assert short.iterations == 1 and not short.converged  # recorded, not warned about
    assert fit_mixture(planted, MixtureSettings(max_iter=100, tol=1e-12)).iterations > 1
    # a variance floor as wide as the data leaves no split: the one-sided rule
    assert fit_mixture(losses, MixtureSettings(reg_covar=1.0)).status == FIT_ONE_SIDED
    with pytest.raises(ValueError, match="gmm_tol > 0"):
        fit_mixture(losses, MixtureSettings(tol=0.0))


def test_degenerate_fits_call_every_sample_clean():
    # every sample called clean (the noisy component swallowed by a wide variance floor)
    all_clean = fit_mixture(_skewed_losses(), MixtureSettings(reg_covar=1.0))
    assert all_clean.status == FIT_ONE_SIDED and torch.all(all_clean.p_clean == 1.0)
    assert "every sample clean (one side empty)" in all_clean.detail
    # every sample called noisy (the clean component empty): no split either, not "drop everything"
    all_noisy = fit_mixture(1.0 - _skewed_losses(), MixtureSettings(reg_covar=1.0))
    assert all_noisy.status == FIT_ONE_SIDED and "every sample noisy" in all_noisy.detail
    assert torch.all(all_noisy.p_clean == 1.0)
    # a fit scikit-learn rejects (collapsed components without a variance floor)
    failed = fit_mixture(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), MixtureSettings(reg_covar=0.0))
    assert failed.status == FIT_FAILED and torch.all(failed.p_clean == 1.0) and "fit failed" in failed.detail
    # both models without a split: ALR does nothing that epoch, even with drop_noisy
    losses = 1.0 - _skewed_losses()
    result = compute_alr(losses, losses.clone(), torch.linspace(0.1, 0.9, 200), drop_noisy=True,
                         mixture=MixtureSettings(reg_covar=1.0))
    assert result.fit_a.degenerate and result.fit_b.degenerate
    assert torch.all(result.weights == 1.0) and result.keep.all() and torch.all(result.consensus == 2)
    assert result.mu == pytest.approx(0.1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="non-finite.*sample 2"):
        compute_alr(torch.tensor([0.1, 0.2, float("nan"), 1.0]), None, torch.zeros(4))
    with pytest.raises(ValueError, match="diag_sims has 3 samples"):
        compute_alr(torch.rand(4), torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match="1-D"):
        compute_alr(torch.rand(4, 2), None, torch.rand(4))


def test_half_planted_noise_is_separated():
    """50% noise; the two models' losses share a per-sample part (a noisy pair is hard for both) plus
    independent model noise, and the clean / noisy loss distributions overlap. The consensus split is
    scored against the truth: 'dropped' = neither model says clean, 'not super-clean' = c < 2."""
    generator = torch.Generator().manual_seed(3)
    n = 4000
    truly_noisy = torch.randperm(n, generator=generator) < n // 2
    shared = torch.where(truly_noisy, 2.5 + 0.5 * torch.randn(n, generator=generator),
                         1.0 + 0.3 * torch.randn(n, generator=generator))
    losses_a = shared + 0.2 * torch.randn(n, generator=generator)
    losses_b = shared + 0.2 * torch.randn(n, generator=generator)
    sims = torch.where(truly_noisy, 0.1, 0.6) + 0.1 * torch.randn(n, generator=generator)
    result = compute_alr(losses_a, losses_b, sims, mu="mean", drop_noisy=True)
    dropped = noise_detection_scores(result.consensus == 0, truly_noisy)
    not_super_clean = noise_detection_scores(result.consensus < 2, truly_noisy)
    for name, scores in (("dropped (c=0)", dropped), ("not super-clean (c<2)", not_super_clean)):
        print(f"planted 50% noise, {name}: precision {scores['precision']:.1f}% "
              f"recall {scores['recall']:.1f}% F1 {scores['f1']:.1f}%")
    assert dropped["precision"] > 97.0 and dropped["recall"] > 80.0
    assert not_super_clean["precision"] > 93.0 and not_super_clean["recall"] > 90.0
    # drop_noisy keeps exactly the samples some model calls clean
    assert torch.equal(result.keep, result.consensus >= 1)
    # with a mean threshold, noisy samples end up with much lower weights on average
    assert result.weights[truly_noisy].mean() < 0.8 * result.weights[~truly_noisy].mean()


def test_noise_detection_scores_counts():
    predicted = torch.tensor([True, True, False, False, True])
    truth = torch.tensor([True, False, True, False, True])
    scores = noise_detection_scores(predicted, truth)
    assert scores["precision"] == pytest.approx(200 / 3)
    assert scores["recall"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)


# six samples, two tight loss clusters per model: clean_a = [1, 1, 1, 0, 0, 0], clean_b = [1, 0, 1, 0, 1, 0]
# -> consensus c = [2, 1, 2, 0, 1, 0] (samples 1 and 4 are the c = 1 ones, in that order)
SIX_A = torch.tensor([0.0, 0.01, 0.02, 0.98, 0.99, 1.0], dtype=torch.float64)
SIX_B = torch.tensor([0.0, 0.99, 0.01, 1.0, 0.02, 0.98], dtype=torch.float64)
SIX_SIMS = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, -0.1], dtype=torch.float64)


@pytest.mark.parametrize("seed, coins", [(5, [1, 0]), (0, [0, 1]), (1, [1, 1]), (3, [0, 0])])
def test_reference_selection_keeps_consensus_two_and_a_seeded_coin_flip_of_consensus_one(seed, coins):
    # the coins: torch.randint(0, 2, (2,)) from Generator().manual_seed(seed) -> [1, 0] for seed 5, [0, 1]
    # for 0, [1, 1] for 1, [0, 0] for 3; coin i decides the i-th c = 1 sample (1 and 4)
    assert torch.randint(0, 2, (2,), generator=torch.Generator().manual_seed(seed)).tolist() == coins
    result = compute_alr(SIX_A, SIX_B, SIX_SIMS, selection="reference", seed=seed)
    assert result.consensus.tolist() == [2, 1, 2, 0, 1, 0]
    assert result.keep.tolist() == [True, bool(coins[0]), True, False, bool(coins[1]), False]
    assert result.weights.tolist() == [1.0] * 6  # the kept pairs train with w = 1
    assert result.mu == pytest.approx(0.7)  # still reported: min over the super-clean set {0, 2}
    project = compute_alr(SIX_A, SIX_B, SIX_SIMS)  # the default is unchanged: soft weights, everything kept
    assert project.keep.all() and project.weights[3] < 1.0


def test_reference_selection_with_one_model_keeps_exactly_its_clean_set():
    # one-model consensus c = 2 clean_a in {0, 2}: no coin is drawn, the clean set of model A is kept, any seed
    for seed in range(4):
        result = compute_alr(SIX_A, None, SIX_SIMS, selection="reference", seed=seed)
        assert result.keep.tolist() == [True, True, True, False, False, False]
        assert result.weights.tolist() == [1.0] * 6


def test_reference_selection_refuses_bad_rules():
    with pytest.raises(ValueError, match="selection must be one of project, reference, got 'coin'"):
        compute_alr(SIX_A, SIX_B, SIX_SIMS, selection="coin")
    with pytest.raises(ValueError, match="drop_noisy must be False"):
        compute_alr(SIX_A, SIX_B, SIX_SIMS, selection="reference", drop_noisy=True)


def test_mu_floor_reference_uses_the_signed_mu():
    from trpr.modeling.alr import similarity_weights

    sims = torch.tensor([0.3, -0.1, -0.5], dtype=torch.float64)
    # mu = -0.2: 0.3 and -0.1 lie at or above mu (w = 1); -0.5 below it: reference s / mu = 2.5 -> sigmoid(12.5),
    # project s / 1e-6 = -5e5 -> 0
    reference = similarity_weights(sims, -0.2, 5.0, mu_floor="reference")
    project = similarity_weights(sims, -0.2, 5.0)
    assert reference.tolist() == pytest.approx([1.0, 1.0, 1 / (1 + math.exp(-12.5))])
    assert project.tolist() == pytest.approx([1.0, 1.0, 0.0])
    # mu = 0: below it s / 0 = -inf -> 0 (no NaN); mu > 0 the two rules agree: 0.5 at s = 0
    assert similarity_weights(sims, 0.0, 5.0, mu_floor="reference").tolist() == [1.0, 0.0, 0.0]
    zero = torch.tensor([0.0, -0.2], dtype=torch.float64)
    assert similarity_weights(zero, 0.4, 5.0, "reference").tolist() == pytest.approx([0.5, 1 / (1 + math.exp(2.5))])
    torch.testing.assert_close(similarity_weights(zero, 0.4, 5.0, "reference"), similarity_weights(zero, 0.4, 5.0))
    with pytest.raises(ValueError, match="mu_floor must be one of project, reference, got 'none'"):
        similarity_weights(sims, 0.2, 5.0, mu_floor="none")
    # through compute_alr: negative similarities on the super-clean set give mu < 0
    result = compute_alr(SIX_A, SIX_B, SIX_SIMS - 1.0, mu_floor="reference")
    assert result.mu == pytest.approx(-0.3)
    assert result.weights[5].item() == pytest.approx(1 / (1 + math.exp(-5.0 * (-1.1 / -0.3))), rel=1e-6)
    assert compute_alr(SIX_A, SIX_B, SIX_SIMS - 1.0).weights[5].item() == pytest.approx(0.0, abs=1e-12)
