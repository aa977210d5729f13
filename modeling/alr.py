"""Adaptive Loss Refinement (ALR, docs/method.md §4): per-epoch sample weights from two models' losses.

Pure functions on 1-D tensors; the training loop gathers the per-sample losses and fused diagonal
similarities of the whole training set, calls :func:`compute_alr` once (on the main process) and
broadcasts the result. scikit-learn is imported lazily, inside :func:`fit_clean_posterior`, so that
``import modeling`` never needs it.

Steps (one call = one epoch):
 1. per model, min–max normalise the losses and fit a 2-component 1-D Gaussian mixture;
    ``p_clean`` = posterior of the lower-mean component, ``clean = p_clean > 0.5``;
 2. consensus ``c = clean_a + clean_b`` in {0, 1, 2}; super-clean set ``C = {c == 2}``
    (if empty: the samples with the highest ``c``);
 3. threshold ``mu`` over the fused diagonal similarities of ``C``: ``min`` | ``mean`` | quantile;
 4. weight ``w = 1`` where ``s >= mu``, else ``sigmoid(sharpness * s / mu)``;
 5. keep flag ``h = 1`` (soft weighting), or with ``drop_noisy`` ``h = [c >= 1]``.

One-model option (``losses_b=None``): ``c = 2 * clean_a`` so that the super-clean set is the clean
set of model A and ``drop_noisy`` drops the samples it calls noisy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

# Gaussian-mixture settings (1-D, two components). A small covariance floor keeps a component from
# collapsing onto a single repeated loss value; a fixed seed makes the fit reproducible.
GMM_MAX_ITER = 100
GMM_TOL = 1e-3
GMM_REG_COVAR = 5e-4
GMM_SEED = 0
# Below this loss range (after min–max normalisation it would be 0/0) every sample is called clean.
DEGENERATE_RANGE = 1e-12
# The ratio s / mu uses max(mu, MU_FLOOR): a non-positive threshold (early, random models) must not
# flip the sign of the ratio or divide by zero; samples below such a mu get a weight near 0.
MU_FLOOR = 1e-6

MuRule = Union[str, float]


@dataclass
class AlrResult:
    """Output of :func:`compute_alr`; every tensor has one entry per training sample (N).

    weights:   float32 [N] in (0, 1] (may underflow towards 0 when mu <= 0), constant for the epoch.
    keep:      bool [N], the keep flag h (all True unless ``drop_noisy``).
    consensus: int64 [N] in {0, 1, 2}, number of models that call the sample clean.
    p_clean_a: float32 [N], model A's posterior of the low-loss component.
    p_clean_b: float32 [N] or None (one-model ALR).
    mu:        the similarity threshold (cosine units).
    """

    weights: torch.Tensor
    keep: torch.Tensor
    consensus: torch.Tensor
    p_clean_a: torch.Tensor
    p_clean_b: Optional[torch.Tensor]
    mu: float


def _as_1d_float64(values, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if tensor.dim() != 1:
        raise ValueError(f"ALR: {name} must be 1-D [N], got shape {tuple(tensor.shape)}")
    if tensor.numel() < 2:
        raise ValueError(f"ALR: {name} needs at least 2 samples, got {tensor.numel()}")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(f"ALR: {name} has {int(bad.sum())} non-finite values (first at sample {first})")
    return tensor


def min_max_normalise(losses: torch.Tensor) -> torch.Tensor:
    """Map losses [N] linearly onto [0, 1] (all zeros when every loss is the same)."""
    low, high = losses.min(), losses.max()
    span = high - low
    if span <= DEGENERATE_RANGE:
        return torch.zeros_like(losses)
    return (losses - low) / span


def fit_clean_posterior(losses) -> torch.Tensor:
    """Posterior of the lower-mean component of a 2-Gaussian mixture fitted to normalised losses.

    losses: [N] per-sample losses (any scale; min–max normalised here).
    Returns float32 [N] in [0, 1]; all ones when the losses are (numerically) constant.
    """
    from sklearn.mixture import GaussianMixture  # lazy: modeling/ must import without scikit-learn

    losses = _as_1d_float64(losses, "losses")
    normalised = min_max_normalise(losses)
    if float(normalised.max()) <= 0.0:
        return torch.ones(losses.numel(), dtype=torch.float32)
    mixture = GaussianMixture(n_components=2, max_iter=GMM_MAX_ITER, tol=GMM_TOL,
                              reg_covar=GMM_REG_COVAR, random_state=GMM_SEED)
    column = normalised.numpy().reshape(-1, 1)
    mixture.fit(column)
    posterior = mixture.predict_proba(column)
    clean_component = int(mixture.means_.reshape(-1).argmin())
    return torch.from_numpy(posterior[:, clean_component]).to(torch.float32)


def similarity_threshold(diag_sims: torch.Tensor, super_clean: torch.Tensor, mu: MuRule) -> float:
    """The threshold mu over the similarities of the super-clean samples.

    diag_sims: float [N] fused diagonal cosine similarities; super_clean: bool [N] (non-empty).
    mu: ``"min"``, ``"mean"``, a quantile as ``"q0.25"`` or a float in [0, 1].
    """
    chosen = diag_sims[super_clean]
    if isinstance(mu, str) and mu == "min":
        return float(chosen.min())
    if isinstance(mu, str) and mu == "mean":
        return float(chosen.mean())
    quantile = parse_quantile(mu)
    return float(torch.quantile(chosen, quantile))


def parse_quantile(mu: MuRule) -> float:
    """The quantile level of a mu rule (``"q0.25"`` or ``0.25``); raises ValueError for anything else."""
    if isinstance(mu, bool):
        raise ValueError(f"ALR: mu must be 'min', 'mean', 'q<level>' or a float in [0, 1], got {mu!r}")
    if isinstance(mu, (int, float)):
        level = float(mu)
    elif isinstance(mu, str) and mu.startswith("q"):
        try:
            level = float(mu[1:])
        except ValueError:
            raise ValueError(f"ALR: mu quantile {mu!r} is not 'q' followed by a number, e.g. 'q0.25'") from None
    else:
        raise ValueError(f"ALR: mu must be 'min', 'mean', 'q<level>' or a float in [0, 1], got {mu!r}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"ALR: mu quantile level must lie in [0, 1], got {level}")
    return level


def validate_mu_rule(mu: MuRule) -> None:
    """Raise ValueError early (config time) when ``mu`` is not a valid rule."""
    if isinstance(mu, str) and mu in ("min", "mean"):
        return
    parse_quantile(mu)


def similarity_weights(diag_sims: torch.Tensor, mu: float, sharpness: float) -> torch.Tensor:
    """w = 1 where s >= mu, else sigmoid(sharpness * s / max(mu, MU_FLOOR)); float64 [N]."""
    ratio = diag_sims / max(mu, MU_FLOOR)
    soft = torch.sigmoid(sharpness * ratio)
    return torch.where(diag_sims >= mu, torch.ones_like(diag_sims), soft)


def compute_alr(losses_a, losses_b, diag_sims, mu: MuRule = "min", sharpness: float = 5.0,
                drop_noisy: bool = False) -> AlrResult:
    """One epoch of ALR from the whole training set's per-sample statistics.

    losses_a, losses_b: [N] per-sample losses of model A and B (losses_b None: one-model ALR).
    diag_sims: [N] fused diagonal similarity S_ii (cosine, averaged over the models).
    mu: threshold rule, see :func:`similarity_threshold`; sharpness: kappa of the sigmoid.
    drop_noisy: keep flag h = [consensus >= 1] instead of all ones.
    """
    validate_mu_rule(mu)
    losses_a = _as_1d_float64(losses_a, "losses_a")
    sims = _as_1d_float64(diag_sims, "diag_sims")
    if sims.numel() != losses_a.numel():
        raise ValueError(f"ALR: diag_sims has {sims.numel()} samples, losses_a {losses_a.numel()}")
    p_clean_a = fit_clean_posterior(losses_a)
    if losses_b is None:
        p_clean_b = None
        consensus = 2 * (p_clean_a > 0.5).long()
    else:
        losses_b = _as_1d_float64(losses_b, "losses_b")
        if losses_b.numel() != losses_a.numel():
            raise ValueError(f"ALR: losses_b has {losses_b.numel()} samples, losses_a {losses_a.numel()}")
        p_clean_b = fit_clean_posterior(losses_b)
        consensus = (p_clean_a > 0.5).long() + (p_clean_b > 0.5).long()
    super_clean = consensus == consensus.max()  # == 2 when any sample is clean for both models
    threshold = similarity_threshold(sims, super_clean, mu)
    weights = similarity_weights(sims, threshold, float(sharpness)).to(torch.float32)
    keep = consensus >= 1 if drop_noisy else torch.ones_like(consensus, dtype=torch.bool)
    return AlrResult(weights=weights, keep=keep, consensus=consensus, p_clean_a=p_clean_a,
                     p_clean_b=p_clean_b, mu=threshold)


def noise_detection_scores(predicted_noisy, true_noisy) -> dict:
    """Precision / recall / F1 (percent) of a noisy-sample prediction, noisy = the positive class.

    predicted_noisy, true_noisy: bool [N]. Precision is 0 when nothing is predicted noisy; recall is
    0 when nothing is truly noisy (both are then reported, not raised).
    """
    predicted = torch.as_tensor(predicted_noisy, dtype=torch.bool).reshape(-1)
    truth = torch.as_tensor(true_noisy, dtype=torch.bool).reshape(-1)
    if predicted.numel() != truth.numel():
        raise ValueError(f"noise_detection_scores: {predicted.numel()} predictions vs {truth.numel()} labels")
    true_positive = int((predicted & truth).sum())
    precision = 100.0 * true_positive / max(int(predicted.sum()), 1)
    recall = 100.0 * true_positive / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
