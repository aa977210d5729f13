"""SDM / TRL losses: every implementation against an independent float64 oracle, forward and backward.

Implementations: "triton" (cuBLAS/torch similarity slabs + Triton kernels, `trpr/kernels/slab.py`) and
"torch" (the PyTorch reference, `trpr/kernels/reference.py`). On the CPU the Triton kernels run under
TRITON_INTERPRET=1 (tests/conftest.py); with a GPU and TRITON_INTERPRET=0 (scripts/gpu_check.sh)
the same tests run compiled on CUDA. The oracle below is written from the formulas of
docs/method.md §3 in float64, dense, and shares no code with the kernels.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from trpr import kernels
from trpr.kernels.reference import (sdm_direction_reference, sdm_loss_reference, trl_direction_reference,
                               trl_loss_reference)
from trpr.kernels.sdm import sdm_loss_triton
from trpr.kernels.slab import SLAB_BUDGET_BYTES, plan_chunks
from trpr.kernels.trl import trl_loss_triton

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
HYPER = {"sdm": {"logit_scale": 50.0}, "trl": {"tau": 0.015, "margin": 0.1}}
IMPLEMENTATIONS = {
    ("sdm", "triton"): sdm_loss_triton, ("sdm", "torch"): sdm_loss_reference,
    ("trl", "triton"): trl_loss_triton, ("trl", "torch"): trl_loss_reference,
}
TRITON_HALF_LOSS, TRITON_HALF_GRAD = 2e-2, 6e-2      # measured ≤ 7e-3 and ≤ 2.7e-2 at D = 48
CASES = [(loss, impl) for loss in ("sdm", "trl") for impl in ("triton", "torch")]
# max |error| / max |oracle| allowed for the loss and for the input gradients, per implementation and dtype.
# Gradients come back in the input dtype (fp16: 2⁻¹¹, bf16: 2⁻⁸ relative rounding); triton with
# fp16/bf16 inputs also runs the slab products on bf16-rounded normalised features (fp32 output).
TOLERANCE = {
    ("triton", torch.float32): (1e-5, 1e-5), ("torch", torch.float32): (1e-5, 1e-5),
    ("triton", torch.float16): (TRITON_HALF_LOSS, TRITON_HALF_GRAD), ("torch", torch.float16): (1e-5, 1e-3),
    ("triton", torch.bfloat16): (TRITON_HALF_LOSS, TRITON_HALF_GRAD), ("torch", torch.bfloat16): (1e-5, 8e-3),
}


# ----------------------------------------------------------------------------- oracle (float64)
def _oracle_sdm(rows, cols, row_pids, col_pids, logit_scale):
    logits = logit_scale * rows @ cols.t()
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    same = (row_pids[:, None] == col_pids[None, :]).double()
    q = same / same.sum(dim=1, keepdim=True)
    return (log_p.exp() * (log_p - torch.log(q + 1e-8))).sum(dim=1)


def _oracle_trl(rows, cols, row_pids, col_pids, tau, margin):
    sims = rows @ cols.t()
    positive = row_pids[:, None] == col_pids[None, :]
    alpha = torch.where(positive, (sims.detach() / tau).exp(), torch.zeros_like(sims))
    alpha = alpha / alpha.sum(dim=1, keepdim=True)
    neg_exp = torch.where(positive, torch.zeros_like(sims), (sims / tau).exp())
    has_negative = (~positive).any(dim=1)
    neg_sum = torch.where(has_negative, neg_exp.sum(dim=1), torch.ones_like(sims[:, 0]))
    hinge = torch.relu(margin - (alpha * sims).sum(dim=1) + tau * torch.log(neg_sum))
    return torch.where(has_negative, hinge, torch.zeros_like(hinge))     # τ·log 0 = −∞: no loss


def oracle(loss, text, image, pids, weights=None, text_cols=None, image_cols=None, col_pids=None, hyper=None):
    """Per-sample loss [b] in float64: text->image + image->text, each row against the columns."""
    direction = {"sdm": _oracle_sdm, "trl": _oracle_trl}[loss]
    hyper = HYPER[loss] if hyper is None else hyper
    t, v = F.normalize(text.double(), dim=1), F.normalize(image.double(), dim=1)
    if text_cols is None:
        all_t, all_v, all_p = t, v, pids
    else:
        all_t, all_v, all_p = F.normalize(text_cols.double(), dim=1), F.normalize(image_cols.double(), dim=1), col_pids
    out = direction(t, all_v, pids, all_p, **hyper) + direction(v, all_t, pids, all_p, **hyper)
    return out if weights is None else out * weights.double()


# ----------------------------------------------------------------------------- helpers
def random_batch(batch, dim, n_pids, seed, dtype=torch.float32):
    """Un-normalised, pid-correlated text/image features [batch, dim] and pids [batch] on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, n_pids, (batch,), generator=gen)
    identity = torch.randn(n_pids, dim, generator=gen)
    norms = 0.5 + 3.0 * torch.rand(batch, 1, generator=gen)
    text = (identity[pids] + 1.5 * torch.randn(batch, dim, generator=gen)) * norms
    image = (identity[pids] + 1.5 * torch.randn(batch, dim, generator=gen)) * norms
    return text.to(DEVICE, dtype), image.to(DEVICE, dtype), pids.to(DEVICE)


def relative_error(actual, expected):
    """max |actual − expected| / max |expected| (float64, floor 1e-2 on the denominator: values below
    that, like SDM's −log(1 + 1e-8) at B = 1, are compared absolutely); NaN fails."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-2))


def check_against_oracle(loss, impl, text, image, pids, weights=None, columns=None, chunk_rows=None, hyper=None):
    """Loss and input gradients (under a non-uniform upstream gradient) of one implementation vs the
    oracle. columns = (row slice, col_pids): those rows against all of (text, image) as columns.
    Returns the implementation's loss."""
    fn = IMPLEMENTATIONS[loss, impl]
    hyper = HYPER[loss] if hyper is None else hyper
    extra = {} if impl == "torch" or chunk_rows is None else {"chunk_rows": chunk_rows}
    upstream = torch.linspace(0.5, 1.5, len(pids), device=text.device, dtype=torch.float64)
    t, v = text.detach().clone().requires_grad_(), image.detach().clone().requires_grad_()
    t64, v64 = text.detach().double().requires_grad_(), image.detach().double().requires_grad_()
    if columns is None:
        got = fn(t, v, pids, weights=weights, **extra, **hyper)
        want = oracle(loss, t64, v64, pids, weights, hyper=hyper)
    else:
        rows, col_pids = columns
        got = fn(t[rows], v[rows], pids[rows], weights=weights, text_cols=t, image_cols=v, col_pids=col_pids,
                 **extra, **hyper)
        want = oracle(loss, t64[rows], v64[rows], pids[rows], weights, t64, v64, col_pids, hyper=hyper)
        upstream = upstream[rows]
    assert got.dtype == torch.float32 and got.shape == want.shape
    grads = torch.autograd.grad((got * upstream.float()).sum(), (t, v))
    want_grads = torch.autograd.grad((want * upstream).sum(), (t64, v64))
    loss_tol, grad_tol = TOLERANCE[impl, text.dtype]
    assert relative_error(got, want) <= loss_tol, (got, want)
    for grad, want_grad in zip(grads, want_grads):
        assert grad.dtype == text.dtype
        assert relative_error(grad, want_grad) <= grad_tol
    return got


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("loss,impl", CASES)
def test_random_batch_several_chunks_weights_with_zeros(loss, impl):
    text, image, pids = random_batch(40, 40, 12, seed=1)
    weights = torch.rand(40, device=DEVICE) * (torch.arange(40, device=DEVICE) % 5 != 0)
    got = check_against_oracle(loss, impl, text, image, pids, weights, chunk_rows=16)   # 3 chunks: 16 + 16 + 8
    assert torch.all(got[weights == 0] == 0)


@pytest.mark.parametrize("loss,impl", CASES)
def test_one_identity_no_negatives(loss, impl):
    """Every sample shares one pid: TRL's negative log-sum is over an empty set, so its loss is 0."""
    text, image, _ = random_batch(7, 32, 1, seed=2)
    pids = torch.full((7,), 4, device=DEVICE)
    got = check_against_oracle(loss, impl, text, image, pids, chunk_rows=4)
    if loss == "trl":
        assert torch.all(got == 0)


@pytest.mark.parametrize("loss,impl", CASES)
def test_all_distinct_identities(loss, impl):
    text, image, _ = random_batch(20, 24, 20, seed=3)
    check_against_oracle(loss, impl, text, image, torch.arange(20, device=DEVICE) * 7)


@pytest.mark.parametrize("loss,impl", CASES)
def test_batch_of_one(loss, impl):
    text, image, pids = random_batch(1, 12, 1, seed=4)
    got = check_against_oracle(loss, impl, text, image, pids)
    assert abs(float(got.detach())) < 1e-6          # p = q = 1 (SDM: −log(1 + 1e-8)); TRL: no negative


@pytest.mark.parametrize("loss,impl", CASES)
def test_rows_whose_only_positive_is_their_own_partner(loss, impl):
    text, image, _ = random_batch(9, 16, 9, seed=5)
    pids = torch.tensor([0, 0, 1, 2, 2, 3, 3, 3, 4], device=DEVICE)      # 1 and 4 are alone
    check_against_oracle(loss, impl, text, image, pids, weights=torch.linspace(0.1, 1.0, 9, device=DEVICE),
                         chunk_rows=4)


@pytest.mark.parametrize("loss,impl", CASES)
def test_rows_against_gathered_columns(loss, impl):
    """Data parallelism: a rank's rows against the whole batch (uneven chunks, duplicate pids)."""
    text, image, pids = random_batch(30, 20, 9, seed=6)
    check_against_oracle(loss, impl, text, image, pids, weights=torch.rand(11, device=DEVICE),
                         columns=(slice(12, 23), pids), chunk_rows=4)


@pytest.mark.parametrize("loss", ["sdm", "trl"])
def test_per_rank_losses_join_into_the_full_batch(loss):
    """Concatenated per-rank losses equal the one-rank loss; summed gradients match too."""
    fn = IMPLEMENTATIONS[loss, "triton"]
    text, image, pids = random_batch(30, 20, 9, seed=7)
    t_full, v_full = text.clone().requires_grad_(), image.clone().requires_grad_()
    full = fn(t_full, v_full, pids, **HYPER[loss])
    full_grads = torch.autograd.grad(full.sum(), (t_full, v_full))
    t, v = text.clone().requires_grad_(), image.clone().requires_grad_()
    per_rank = [fn(t[a:b], v[a:b], pids[a:b], text_cols=t, image_cols=v, col_pids=pids, chunk_rows=8,
                   **HYPER[loss]) for a, b in ((0, 12), (12, 20), (20, 30))]
    grads = torch.autograd.grad(torch.cat(per_rank).sum(), (t, v))
    assert relative_error(torch.cat(per_rank), full) <= 1e-5
    for grad, full_grad in zip(grads, full_grads):
        assert relative_error(grad, full_grad) <= 1e-5


@pytest.mark.parametrize("loss,impl", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(loss, impl, dtype):
    text, image, pids = random_batch(24, 48, 8, seed=8, dtype=dtype)
    check_against_oracle(loss, impl, text, image, pids, weights=torch.rand(24, device=DEVICE), chunk_rows=8)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_trl_margin_above_every_similarity_keeps_every_hinge_active(impl):
    """Margin 1.5 > any Σ α S: every row with a negative has a loss > 0 and a gradient."""
    text, image, pids = random_batch(12, 16, 4, seed=9)
    got = check_against_oracle("trl", impl, text, image, pids, hyper={"tau": 0.015, "margin": 1.5})
    assert torch.all(got > 0)


def test_chunk_plan_balances_rows_within_the_budget():
    chunks = plan_chunks(32768, 32768, 6)
    sizes = [b - a for a, b in chunks]
    assert chunks[0][0] == 0 and chunks[-1][1] == 32768
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))          # contiguous
    assert max(sizes) * 32768 * 6 <= SLAB_BUDGET_BYTES * 1.03 and max(sizes) % 128 == 0
    assert max(sizes) - min(sizes) < 128 * len(chunks)                         # balanced
    assert plan_chunks(100, 1000, 6) == [(0, 100)]
    assert plan_chunks(10, 5, 6, chunk_rows=4) == [(0, 4), (4, 8), (8, 10)]


def test_columns_must_come_complete_and_match_the_width():
    text, image, pids = random_batch(10, 8, 10, seed=29)
    with pytest.raises(ValueError, match="text_cols, image_cols, col_pids"):
        kernels.trl_loss(text[:4], image[:4], pids[:4], col_pids=pids, backend="torch")
    with pytest.raises(ValueError, match="image_cols must be"):
        kernels.sdm_loss(text[:4], image[:4], pids[:4], text_cols=text, image_cols=image[:, :5], col_pids=pids,
                         backend="torch")


def test_bad_shapes_name_the_argument():
    text, image, pids = random_batch(6, 8, 3, seed=31)
    with pytest.raises(ValueError, match="pids"):
        kernels.sdm_loss(text, image, pids[:5])
    with pytest.raises(ValueError, match="weights"):
        kernels.trl_loss(text, image, pids, weights=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="image_feats"):
        kernels.sdm_loss(text, image[:, :4], pids)
    with pytest.raises(ValueError, match="backend"):
        kernels.sdm_loss(text, image, pids, backend="cuda")


@pytest.mark.parametrize("loss_fn", [kernels.sdm_loss, kernels.trl_loss])
def test_backend_dispatch(loss_fn):
    text, image, pids = random_batch(9, 16, 4, seed=37)
    forced_torch = loss_fn(text, image, pids, backend="torch")
    forced_triton = loss_fn(text, image, pids, backend="triton")
    auto = loss_fn(text, image, pids)
    assert relative_error(forced_triton, forced_torch) <= 1e-5
    expected_auto = forced_triton if DEVICE == "cuda" else forced_torch
    assert torch.equal(auto, expected_auto)


# ----------------------------------------------------------------------------- reference checks
def test_reference_sdm_equals_naive_dense_formula():
    text, image, pids = random_batch(7, 10, 3, seed=41, dtype=torch.float64)
    text, image, pids = text.cpu(), image.cpu(), pids.cpu()
    weights = torch.rand(7, dtype=torch.float64)
    got = sdm_loss_reference(text, image, pids, logit_scale=50.0, weights=weights)

    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    t = [unit(row) for row in text.tolist()]
    v = [unit(row) for row in image.tolist()]
    p_ids = pids.tolist()

    def direction(rows, cols, i):
        logits = [50.0 * sum(a * b for a, b in zip(rows[i], c)) for c in cols]
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        p = [e / sum(exps) for e in exps]
        y = [1.0 if p_ids[i] == p_ids[j] else 0.0 for j in range(len(cols))]
        q = [yj / sum(y) for yj in y]
        return sum(pj * (math.log(pj) - math.log(qj + 1e-8)) for pj, qj in zip(p, q))

    expected = [weights[i].item() * (direction(t, v, i) + direction(v, t, i)) for i in range(7)]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_reference_trl_one_positive_closed_form():
    """With unique pids α = 1: ℓ = Σ_dirs [m − S_ii + τ log Σ_{j≠i} exp(S_ij/τ)]₊."""
    text, image, _ = random_batch(6, 10, 6, seed=43, dtype=torch.float64)
    text, image = text.cpu(), image.cpu()
    pids = torch.arange(6)
    got = trl_loss_reference(text, image, pids, tau=0.05, margin=0.3)
    sims = F.normalize(text, dim=1) @ F.normalize(image, dim=1).t()
    expected = torch.zeros(6, dtype=torch.float64)
    for s in (sims, sims.t()):
        for i in range(6):
            negatives = torch.cat([s[i, :i], s[i, i + 1:]])
            expected[i] += max(0.3 - s[i, i].item() + 0.05 * torch.logsumexp(negatives / 0.05, 0).item(), 0.0)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(47)
    text = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    image = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    shared_pids = torch.tensor([0, 1, 1, 2, 3, 3])
    assert torch.autograd.gradcheck(lambda t, v: sdm_loss_reference(t, v, shared_pids, logit_scale=5.0),
                                    (text, image), fast_mode=True)
    # TRL's α is detached by definition, so finite differences only agree where α is constant:
    # one positive per row (α = 1). tau / margin chosen so that every hinge is active.
    unique_pids = torch.arange(6)
    assert torch.autograd.gradcheck(lambda t, v: trl_loss_reference(t, v, unique_pids, tau=0.5, margin=3.0),
                                    (text, image), fast_mode=True)
    rows = F.normalize(text.detach(), dim=1).requires_grad_()
    cols = F.normalize(image.detach(), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, c: sdm_direction_reference(r, c, shared_pids, shared_pids, 7.0), (rows, cols), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda r, c: trl_direction_reference(r, c, unique_pids, unique_pids, 0.5, 3.0), (rows, cols), fast_mode=True)


@pytest.mark.parametrize("loss", ["sdm", "trl"])
def test_triton_path_ignores_autocast(loss):
    """Under mixed precision the slabs stay float32: same losses and gradients as without autocast."""
    text, image, pids = random_batch(16, 24, 5, seed=55)
    fn = IMPLEMENTATIONS[loss, "triton"]
    results = []
    for enabled in (False, True):
        t = text.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            got = fn(t, image, pids, chunk_rows=8, **HYPER[loss])
        results.append((got, torch.autograd.grad(got.sum(), t)[0]))
    (plain, plain_grad), (mixed, mixed_grad) = results
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain) and torch.equal(mixed_grad, plain_grad)


@pytest.mark.parametrize("loss_fn", [kernels.sdm_loss, kernels.trl_loss])
def test_reference_computes_in_float32_under_autocast(loss_fn):
    text, image, pids = random_batch(8, 16, 3, seed=53)
    plain = loss_fn(text, image, pids, backend="torch")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = loss_fn(text, image, pids, backend="torch")
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)
