"""The option vocabularies and the pure value rules a config is validated with (no torch, no trpr import).

`configs.validate` checks a recipe with them and `modeling` implements them, importing them from here:
`configs` is a leaf that never imports `modeling` (docs/design.md). Home of
- `alr.selection` / `alr.mu_floor` choices (SELECTION_RULES, MU_FLOOR_RULES), the mu-rule parser
  (parse_quantile, validate_mu_rule), the per-model mixture settings (MixtureSettings) and the
  `alr.gmm_preset` table (GMM_PRESETS, mixture_preset): used by `modeling.alr`;
- `model.image_tokens` choices (IMAGE_TOKEN_MODES): used by `modeling.fused` / `modeling.model`;
- the retrieval rows (SCORES, MODEL_ROWS, ROW_KEYS, parse_row_key) and the `eval.select_row` rule parser
  (selection_rows): used by `modeling.pair`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

# compute_alr's selection rules: "project" = the soft weights (+ drop_noisy's keep flags); "reference" = the
# reference's hard selection (c = 2 kept, c = 1 kept on a seeded coin flip, c = 0 dropped; w = 1 for all)
SELECTION_RULES = ("project", "reference")
# the ratio s / mu of the weight: "project" uses max(mu, MU_FLOOR); "reference" the signed mu as it is (the
# reference code: for mu < 0 a sample below mu gets s / mu > 1, i.e. a weight near 1)
MU_FLOOR_RULES = ("project", "reference")

# topk: the k most attended patches (the paper); all: every patch, CLS excluded; reference: every token, CLS
# included (the rebuilt reference code: it gathers the top-k, then overwrites them with all image tokens)
IMAGE_TOKEN_MODES = ("topk", "all", "reference")


@dataclass(frozen=True)
class MixtureSettings:
    """The per-model 2-component Gaussian mixture (scikit-learn GaussianMixture, 1-D): at most
    `max_iter` EM iterations, convergence tolerance `tol` (on the lower bound's gain), `reg_covar`
    added to the variances (the losses are min–max normalised to [0, 1], so reg_covar is in those
    squared units), fixed `seed` (k-means initialisation): the fit is deterministic."""

    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = 5e-4
    seed: int = 0

    @classmethod
    def from_config(cls, alr_cfg: dict) -> "MixtureSettings":
        """From a config `alr` section (gmm_max_iter, gmm_tol, gmm_reg_covar)."""
        return cls(max_iter=int(alr_cfg["gmm_max_iter"]), tol=float(alr_cfg["gmm_tol"]),
                   reg_covar=float(alr_cfg["gmm_reg_covar"]))

    def check(self) -> None:
        """ValueError unless max_iter >= 1, tol > 0 and reg_covar >= 0."""
        if self.max_iter < 1 or not self.tol > 0 or not self.reg_covar >= 0:
            raise ValueError(f"ALR mixture settings need gmm_max_iter >= 1, gmm_tol > 0 and gmm_reg_covar >= 0, "
                             f"got {self.max_iter}, {self.tol}, {self.reg_covar}")


# alr.gmm_preset: named (gmm_max_iter, gmm_tol, gmm_reg_covar) rules, docs/method.md §10. "reference": the rebuilt
# 3RTPR reference code (10 / 1e-2 / 5e-4, on RSTPReid 100 / 1e-4 / 1e-6); "rde": RDE's rule (100 / 1e-4 / 1e-6
# above 0.4 noise and on RSTPReid, 10 / 1e-2 / 5e-4 otherwise); "none": the three keys as given.
GMM_PRESETS = ("none", "reference", "rde")
LIGHT_MIXTURE = (10, 1e-2, 5e-4)
FULL_MIXTURE = (100, 1e-4, 1e-6)


def mixture_preset(preset: str, dataset: str, noise_rate: float) -> Optional[tuple[int, float, float]]:
    """(gmm_max_iter, gmm_tol, gmm_reg_covar) of a GMM_PRESETS rule for a dataset and noise rate; None for
    "none"; ValueError for an unknown preset."""
    if preset not in GMM_PRESETS:
        raise ValueError(f"gmm_preset must be one of {', '.join(GMM_PRESETS)}, got {preset!r}")
    if preset == "none":
        return None
    rstpreid = dataset.lower() == "rstpreid"
    if preset == "reference":
        return FULL_MIXTURE if rstpreid else LIGHT_MIXTURE
    return FULL_MIXTURE if rstpreid or noise_rate > 0.4 else LIGHT_MIXTURE


MuRule = Union[str, float]


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


SCORES = ("GE", "FS", "GE+FS")
MODEL_ROWS = (("A", (0,)), ("B", (1,)), ("A+B", (0, 1)))  # row name -> indices into (pair.a, pair.b)
ROW_KEYS = tuple(f"{model}/{score}" for model, _ in MODEL_ROWS for score in SCORES)


def parse_row_key(row: str) -> tuple[tuple[int, ...], str]:
    """"A+B/GE+FS" -> ((0, 1), "GE+FS"): the model indices and the score of a row key (see ROW_KEYS);
    ValueError naming the accepted keys otherwise."""
    model_name, _, score = str(row).partition("/")
    models = dict(MODEL_ROWS)
    if model_name not in models or score not in SCORES:
        raise ValueError(f"{row!r}: expected one of {', '.join(ROW_KEYS)}")
    return models[model_name], score


def selection_rows(rule: str) -> tuple[str, ...]:
    """The rows of a model-selection rule (config eval.select_row): a row key ("A+B/GE+FS") -> (row,);
    "max(A+B/GE, A+B/FS)" -> ("A+B/GE", "A+B/FS"), the best of which counts (the reference code keeps the
    checkpoint with the best max(GE R@1, FS R@1), docs/method.md §10). ValueError naming the accepted forms."""
    text = str(rule).strip()
    if text.startswith("max(") and text.endswith(")"):
        rows = tuple(part.strip() for part in text[4:-1].split(","))
        if len(rows) < 2:
            raise ValueError(f"{rule!r}: max( ) needs two rows or more, e.g. 'max(A+B/GE, A+B/FS)'")
    else:
        rows = (text,)
    for row in rows:
        parse_row_key(row)
    return rows
