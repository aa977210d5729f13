"""The training losses of 3RTPR as modules that own data parallelism (docs/method.md §3).

Layering (as in Liger-Kernel / open_clip's ClipLoss): `kernels.sdm_loss` / `kernels.trl_loss` compute
per-sample losses of ROWS against COLUMNS and know nothing about processes; the modules here know
their rank and world size, gather the global batch's features (with gradient) as the columns, and
reduce the per-sample losses to the scalar this process back-propagates.

    loss = TrainingLoss.from_config(config["loss"], rank=0, world_size=1)
    value = loss(text_feats [b, D], image_feats [b, D], pids [b], weights [b] | None, keep [b] | None)
    per_sample = loss.alr_term.per_sample(text_feats, image_feats, pids)      # [b], the ALR statistic

Reduction (the one place: `PairLoss.reduce`, docs/method.md §3): with w the ALR weights and h the keep
flags of the global batch, SDM contributes  λ · Σ_i h_i w_i ℓ_i / Σ_i h_i  (mean over the kept samples)
and TRL contributes  λ · Σ_i h_i w_i ℓ_i  (SUMMED over the batch), as RDE and the reference do (with
Adam eps 1e-3 the loss scale changes the step size). The sums run over the GLOBAL batch; this process
returns its rows' share, so the shares of all processes add up to the term.
No host synchronisation anywhere in these modules.
"""
from __future__ import annotations

import torch
from torch import nn

from trpr import kernels

from .collectives import gather_rows


class PairLoss(nn.Module):
    """A per-sample image-text loss over the global batch (base class of SDMLoss / TRLLoss).

    weight: λ of the term. rank / world_size: this process and the number of processes (1: no
    gathering). backend: passed to the kernel ("auto" | "triton" | "torch").
    """

    name = ""
    # reduce() divides by Σ h (the kept samples of the global batch) when True, else sums (docs/method.md §3)
    mean_over_kept = True

    def __init__(self, weight: float = 1.0, *, rank: int = 0, world_size: int = 1, backend: str = "auto"):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.weight, self.rank, self.world_size, self.backend = float(weight), rank, world_size, backend

    def extra_repr(self) -> str:
        return f"weight={self.weight}, rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"

    def columns(self, text_feats: torch.Tensor, image_feats: torch.Tensor, pids: torch.Tensor) -> dict:
        """The global batch as kernel columns: {"text_cols" [B, D], "image_cols" [B, D], "col_pids" [B]},
        gathered in rank order with gradient (B = world_size · b); {} with one process (the rows are
        their own columns)."""
        if self.world_size == 1:
            return {}
        return {"text_cols": gather_rows(text_feats, self.world_size),
                "image_cols": gather_rows(image_feats, self.world_size),
                "col_pids": gather_rows(pids, self.world_size)}

    def kernel(self, text_feats, image_feats, pids, weights, columns: dict) -> torch.Tensor:
        """The kernel call: per-sample losses [b] fp32 of the rows against `columns`."""
        raise NotImplementedError

    def per_sample(self, text_feats: torch.Tensor, image_feats: torch.Tensor, pids: torch.Tensor,
                   weights: torch.Tensor | None = None, columns: dict | None = None) -> torch.Tensor:
        """ℓ_i · weights_i [b] float32 of this process's rows against the global batch.

        text_feats / image_feats [b, D] un-normalised (normalised by the kernel), pids [b] int,
        weights [b] or None (no gradient through them); columns: from `columns()` (gathered here
        when None)."""
        if columns is None:
            columns = self.columns(text_feats, image_feats, pids)
        return self.kernel(text_feats, image_feats, pids, weights, columns)

    def reduce(self, per_sample: torch.Tensor, kept_total: torch.Tensor) -> torch.Tensor:
        """THE reduction of a term, a 0-dim tensor: λ · Σ_rows (h w ℓ) / Σ_global-batch h when
        `mean_over_kept` (SDM), λ · Σ_rows (h w ℓ) otherwise (TRL: summed, as RDE and the reference).

        per_sample [b]: h_i w_i ℓ_i of this process's rows; kept_total: Σ h over the global batch
        (at least 1). Summed over the processes this gives the term's loss on the global batch."""
        total = self.weight * per_sample.sum()
        return total / kept_total if self.mean_over_kept else total

    def kept_total(self, keep: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        """Σ h over the global batch, clamped to at least 1 (keep None: every sample kept)."""
        if keep is None:
            return torch.tensor(float(batch_size * self.world_size), device=device)
        return gather_rows(keep.float(), self.world_size).sum().clamp(min=1.0)

    def forward(self, text_feats, image_feats, pids, weights=None, keep=None) -> torch.Tensor:
        """This process's share of the term on the global batch (see `reduce`); weights w [b] and keep
        flags h [b] (bool or 0/1) of this process's rows, None = all ones."""
        weights, kept_total = sample_weights(self, weights, keep, pids)
        return self.reduce(self.per_sample(text_feats, image_feats, pids, weights), kept_total)


class SDMLoss(PairLoss):
    """Similarity distribution matching (`kernels.sdm_loss`): KL from the softmax of logit_scale · cos to
    the identity targets, text->image plus image->text."""

    name = "sdm"

    def __init__(self, logit_scale: float = 50.0, weight: float = 1.0, **distribution):
        super().__init__(weight, **distribution)
        self.logit_scale = float(logit_scale)

    def kernel(self, text_feats, image_feats, pids, weights, columns: dict) -> torch.Tensor:
        return kernels.sdm_loss(text_feats, image_feats, pids, self.logit_scale, weights, **columns,
                                backend=self.backend)


class TRLLoss(PairLoss):
    """Triplet ranking loss with a softmax over the positives and a log-sum-exp over the negatives
    (`kernels.trl_loss`), text->image plus image->text; summed over the batch (not averaged)."""

    name = "trl"
    mean_over_kept = False  # Σ h w ℓ over the batch (RDE, the reference; docs/method.md §3)

    def __init__(self, tau: float = 0.015, margin: float = 0.1, weight: float = 1.0, **distribution):
        super().__init__(weight, **distribution)
        self.tau, self.margin = float(tau), float(margin)

    def kernel(self, text_feats, image_feats, pids, weights, columns: dict) -> torch.Tensor:
        return kernels.trl_loss(text_feats, image_feats, pids, self.tau, self.margin, weights, **columns,
                                backend=self.backend)


def sample_weights(term: PairLoss, weights, keep, pids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h·w [b] or None, Σ h over the global batch) for the weights w and keep flags h of the rows."""
    if keep is not None:
        keep = keep.float()
        weights = keep if weights is None else weights * keep
    return weights, term.kept_total(keep, pids.shape[0], pids.device)


class TrainingLoss(nn.Module):
    """The loss one model is trained with: the sum of its terms (SDM and/or TRL), gathered once.

    terms: PairLoss modules sharing rank / world_size. Call as a PairLoss: (text_feats, image_feats,
    pids, weights=None, keep=None) -> this process's share of λ_sdm Σ h w ℓ_sdm / Σ h + λ_trl Σ h w ℓ_trl.
    """

    def __init__(self, terms: list[PairLoss], alr_scoring: PairLoss | None = None):
        super().__init__()
        if not terms:
            raise ValueError("TrainingLoss needs at least one term (every loss weight is 0)")
        self.terms = nn.ModuleList(terms)
        self.alr_scoring = alr_scoring  # scores the ALR pass instead of terms[0] (loss.trl_temperature reference)

    @classmethod
    def from_config(cls, loss_cfg: dict, rank: int = 0, world_size: int = 1, backend: str = "auto") -> "TrainingLoss":
        """The terms with λ > 0 of a config `loss` section (lambda_sdm, lambda_trl, logit_scale, tau, margin,
        trl_temperature). trl_temperature "reference" (the reference code, docs/method.md §10): TRL is
        TRAINED with τ = margin, while the ALR pass scores TRL with τ (when TRL is the ALR term)."""
        distribution = dict(rank=rank, world_size=world_size, backend=backend)
        reference = loss_cfg.get("trl_temperature", "tau") == "reference"
        terms, alr_scoring = [], None
        if loss_cfg["lambda_sdm"] > 0:
            terms.append(SDMLoss(loss_cfg["logit_scale"], loss_cfg["lambda_sdm"], **distribution))
        if loss_cfg["lambda_trl"] > 0:
            train_tau = loss_cfg["margin"] if reference else loss_cfg["tau"]
            terms.append(TRLLoss(train_tau, loss_cfg["margin"], loss_cfg["lambda_trl"], **distribution))
            if reference and loss_cfg["lambda_sdm"] <= 0:
                alr_scoring = TRLLoss(loss_cfg["tau"], loss_cfg["margin"], loss_cfg["lambda_trl"], **distribution)
        return cls(terms, alr_scoring)

    @property
    def alr_term(self) -> PairLoss:
        """The term whose per-sample losses ALR models (docs/method.md §4): SDM when it is trained, else TRL
        (with τ, also when loss.trl_temperature "reference" trains TRL with τ = margin)."""
        return self.alr_scoring if self.alr_scoring is not None else self.terms[0]

    def forward(self, text_feats, image_feats, pids, weights=None, keep=None) -> torch.Tensor:
        first = self.terms[0]
        weights, kept_total = sample_weights(first, weights, keep, pids)
        columns = first.columns(text_feats, image_feats, pids)
        return sum(term.reduce(term.per_sample(text_feats, image_feats, pids, weights, columns), kept_total)
                   for term in self.terms)
