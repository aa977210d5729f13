"""Adaptive Loss Refinement (ALR, docs/method.md §4): per-epoch sample weights from two models' losses.

Pure functions on 1-D tensors; the training loop gathers the per-sample losses and fused diagonal
similarities of the whole training set, calls :func:`compute_alr` once (on the main process) and
broadcasts the result. scikit-learn is imported lazily, inside :func:`fit_mixture`, so that
``from trpr import modeling`` never needs it.

Steps (one call = one epoch):
 1. per model, min–max normalise the losses and fit a 2-component 1-D Gaussian mixture
    (:class:`MixtureSettings`: iterations, tolerance, reg_covar); ``p_clean`` = posterior of the
    lower-mean component, ``clean = p_clean > 0.5``. Degenerate fits (constant losses, a fit that
    fails, a split that leaves one side empty) give no split: every sample is clean for that model
    (``MixtureFit.status`` says which rule applied);
 2. consensus ``c = clean_a + clean_b`` in {0, 1, 2}; super-clean set ``C = {c == 2}``
    (if empty: the samples with the highest ``c``);
 3. threshold ``mu`` over the fused diagonal similarities of ``C``: ``min`` | ``mean`` | quantile;
 4. weight ``w = 1`` where ``s >= mu``, else ``sigmoid(sharpness * s / mu)``;
 5. keep flag ``h = 1`` (soft weighting), or with ``drop_noisy`` ``h = [c >= 1]``;
    ``selection="reference"`` (the rebuilt reference code's and RDE's hard rule, docs/method.md §10) instead
    keeps every ``c = 2`` sample and a seeded coin-flip half of the ``c = 1`` samples, with ``w = 1``.

One-model option (``losses_b=None``): ``c = 2 * clean_a`` so that the super-clean set is the clean
set of model A and ``drop_noisy`` drops the samples it calls noisy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

# the option vocabularies and pure rules live in configs.choices (configs validates with them, never imports
# modeling); re-exported here, where the ALR implements them
from trpr.configs.choices import (FULL_MIXTURE, GMM_PRESETS, LIGHT_MIXTURE, MU_FLOOR_RULES,  # noqa: F401
                                  SELECTION_RULES, MixtureSettings, MuRule, mixture_preset, parse_quantile,
                                  validate_mu_rule)

# Below this loss range (after min–max normalisation it would be 0/0) no mixture is fitted.
DEGENERATE_RANGE = 1e-12
# The ratio s / mu uses max(mu, MU_FLOOR): a non-positive threshold (early, random models) must not
# flip the sign of the ratio or divide by zero; samples below such a mu get a weight near 0.
MU_FLOOR = 1e-6

# MixtureFit.status values: the rule that decided a model's clean/noisy split this epoch
FIT_OK = "ok"                            # the mixture's split is used
FIT_CONSTANT_LOSSES = "constant_losses"  # every loss equal: nothing to fit, every sample clean
FIT_FAILED = "fit_failed"                # scikit-learn could not fit (e.g. reg_covar 0): every sample clean
FIT_ONE_SIDED = "one_sided"              # the split called every sample clean, or every sample noisy
#                                          (one component empty): no split, every sample clean
DEGENERATE_RULE = "no split: the model calls every sample clean this epoch"

@dataclass
class MixtureFit:
    """One model's mixture fit of one epoch.

    p_clean:   float32 [N] in [0, 1], the posterior of the lower-mean (clean) component; all ones when
               `status` is not FIT_OK (the degenerate rule: no split, every sample clean).
    status:    FIT_OK | FIT_CONSTANT_LOSSES | FIT_FAILED | FIT_ONE_SIDED.
    converged: whether EM converged within max_iter (False when nothing was fitted).
    iterations: EM iterations run (0 when nothing was fitted).
    means / weights: the fitted components' means (normalised loss units) and mixing proportions,
               clean component first; empty when nothing was fitted.
    detail:    one line saying what happened when status is not FIT_OK, else "".
    """

    p_clean: torch.Tensor
    status: str = FIT_OK
    converged: bool = False
    iterations: int = 0
    means: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    detail: str = ""

    @property
    def degenerate(self) -> bool:
        return self.status != FIT_OK

    def record(self) -> dict:
        """JSON-able summary for the epoch's ALR record."""
        return {"status": self.status, "converged": self.converged, "iterations": self.iterations,
                "means": self.means, "weights": self.weights,
                "clean_fraction": float((self.p_clean > 0.5).float().mean()),
                **({"rule": f"{self.detail}; {DEGENERATE_RULE}"} if self.degenerate else {})}


@dataclass
class AlrResult:
    """Output of :func:`compute_alr`; every tensor has one entry per training sample (N).

    weights:   float32 [N] in [0, 1] (may underflow towards 0 when mu <= 0), constant for the epoch.
    keep:      bool [N], the keep flag h (all True unless ``drop_noisy`` or selection "reference").
    consensus: int64 [N] in {0, 1, 2}, number of models that call the sample clean.
    fit_a / fit_b: the models' MixtureFit (fit_b None: one-model ALR).
    mu:        the similarity threshold (cosine units).
    """

    weights: torch.Tensor
    keep: torch.Tensor
    consensus: torch.Tensor
    fit_a: MixtureFit
    fit_b: Optional[MixtureFit]
    mu: float

    @property
    def p_clean_a(self) -> torch.Tensor:
        """float32 [N], model A's posterior of the low-loss component (ones after a degenerate fit)."""
        return self.fit_a.p_clean

    @property
    def p_clean_b(self) -> Optional[torch.Tensor]:
        return None if self.fit_b is None else self.fit_b.p_clean


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


def fit_mixture(losses, settings: MixtureSettings = MixtureSettings()) -> MixtureFit:
    """Fit a 2-Gaussian mixture to min–max normalised losses; the clean posterior and the rule applied.

    losses: [N] per-sample losses (any scale; min–max normalised here). Degenerate cases give no split
    (`p_clean` all ones, every sample clean): constant losses (no fit), a fit scikit-learn rejects,
    and a split (p_clean > 0.5) that puts every sample on one side.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture  # lazy: trpr/modeling/ must import without scikit-learn

    settings.check()
    losses = _as_1d_float64(losses, "losses")
    no_split = torch.ones(losses.numel(), dtype=torch.float32)
    normalised = min_max_normalise(losses)
    if float(normalised.max()) <= 0.0:
        return MixtureFit(no_split, FIT_CONSTANT_LOSSES,
                          detail=f"all {losses.numel()} losses equal ({float(losses[0]):.6g})")
    mixture = GaussianMixture(n_components=2, max_iter=settings.max_iter, tol=settings.tol,
                              reg_covar=settings.reg_covar, random_state=settings.seed)
    column = normalised.numpy().reshape(-1, 1)
    try:
        with warnings.catch_warnings():  # non-convergence is recorded in MixtureFit.converged instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit(column)
    except ValueError as error:
        return MixtureFit(no_split, FIT_FAILED, detail=f"the mixture fit failed ({error})")
    order = mixture.means_.reshape(-1).argsort()  # clean (lower mean) first
    posterior = torch.from_numpy(mixture.predict_proba(column)[:, order[0]]).to(torch.float32)
    fit = MixtureFit(posterior, FIT_OK, bool(mixture.converged_), int(mixture.n_iter_),
                     [float(m) for m in mixture.means_.reshape(-1)[order]],
                     [float(w) for w in mixture.weights_[order]])
    clean = int((posterior > 0.5).sum())
    if clean in (0, losses.numel()):
        fit.p_clean, fit.status = no_split, FIT_ONE_SIDED
        fit.detail = f"the mixture called every sample {'clean' if clean else 'noisy'} (one side empty)"
    return fit


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


def similarity_weights(diag_sims: torch.Tensor, mu: float, sharpness: float, mu_floor: str = "project") -> torch.Tensor:
    """w = 1 where s >= mu, else sigmoid(sharpness * s / max(mu, MU_FLOOR)); float64 [N]. mu_floor
    "reference": sigmoid(sharpness * s / mu) with the signed mu, no floor (mu = 0: 0 below it)."""
    if mu_floor not in MU_FLOOR_RULES:
        raise ValueError(f"ALR: mu_floor must be one of {', '.join(MU_FLOOR_RULES)}, got {mu_floor!r}")
    ratio = diag_sims / (max(mu, MU_FLOOR) if mu_floor == "project" else mu)
    soft = torch.sigmoid(sharpness * ratio)
    return torch.where(diag_sims >= mu, torch.ones_like(diag_sims), soft)


def reference_selection(consensus: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference's (and RDE's) hard selection: keep [N] bool = c == 2, plus the c == 1 samples whose coin
    comes up 1; the coins are ``torch.randint(0, 2, (number of c == 1 samples,))`` from a generator seeded with
    `seed`, one per c == 1 sample in index order (RDE adds such a coin to c and keeps c > 1). With one-model
    consensus (c in {0, 2}) no coin is drawn: the model's clean set is kept."""
    keep = consensus == 2
    middle = consensus == 1
    coins = torch.randint(0, 2, (int(middle.sum()),), generator=torch.Generator().manual_seed(int(seed)))
    keep[middle] = coins.bool()
    return keep


def compute_alr(losses_a, losses_b, diag_sims, mu: MuRule = "min", sharpness: float = 5.0,
                drop_noisy: bool = False, mixture: MixtureSettings = MixtureSettings(),
                selection: str = "project", seed: int = 0, mu_floor: str = "project") -> AlrResult:
    """One epoch of ALR from the whole training set's per-sample statistics.

    losses_a, losses_b: [N] per-sample losses of model A and B (losses_b None: one-model ALR).
    diag_sims: [N] fused diagonal similarity S_ii (cosine, averaged over the models).
    mu: threshold rule, see :func:`similarity_threshold`; sharpness: kappa of the sigmoid.
    drop_noisy: keep flag h = [consensus >= 1] instead of all ones.
    mixture: the Gaussian-mixture settings (:class:`MixtureSettings`).
    selection: "project" (the weights and keep flags above) or "reference" (:func:`reference_selection`
    with `seed`: hard keep flags, every weight 1; drop_noisy must then be False; mu is still reported).
    mu_floor: "project" (s / max(mu, MU_FLOOR)) or "reference" (s / mu, no floor): :func:`similarity_weights`.
    When neither model splits (degenerate fits, or every sample clean for both) the super-clean set is
    every sample, mu = the lowest similarity and every weight is 1: ALR does nothing that epoch.
    """
    validate_mu_rule(mu)
    if selection not in SELECTION_RULES:
        raise ValueError(f"ALR: selection must be one of {', '.join(SELECTION_RULES)}, got {selection!r}")
    if selection == "reference" and drop_noisy:
        raise ValueError("ALR: selection 'reference' sets the keep flags itself; drop_noisy must be False")
    losses_a = _as_1d_float64(losses_a, "losses_a")
    sims = _as_1d_float64(diag_sims, "diag_sims")
    if sims.numel() != losses_a.numel():
        raise ValueError(f"ALR: diag_sims has {sims.numel()} samples, losses_a {losses_a.numel()}")
    fit_a = fit_mixture(losses_a, mixture)
    if losses_b is None:
        fit_b = None
        consensus = 2 * (fit_a.p_clean > 0.5).long()
    else:
        losses_b = _as_1d_float64(losses_b, "losses_b")
        if losses_b.numel() != losses_a.numel():
            raise ValueError(f"ALR: losses_b has {losses_b.numel()} samples, losses_a {losses_a.numel()}")
        fit_b = fit_mixture(losses_b, mixture)
        consensus = (fit_a.p_clean > 0.5).long() + (fit_b.p_clean > 0.5).long()
    super_clean = consensus == consensus.max()  # == 2 when any sample is clean for both models
    threshold = similarity_threshold(sims, super_clean, mu)
    weights = similarity_weights(sims, threshold, float(sharpness), mu_floor).to(torch.float32)
    keep = consensus >= 1 if drop_noisy else torch.ones_like(consensus, dtype=torch.bool)
    if selection == "reference":
        keep, weights = reference_selection(consensus, seed), torch.ones_like(weights)
    return AlrResult(weights=weights, keep=keep, consensus=consensus, fit_a=fit_a, fit_b=fit_b, mu=threshold)


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
