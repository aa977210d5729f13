"""SDM / TRL losses: Triton kernels against the float64 PyTorch reference, and the reference itself.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with a GPU and
TRITON_INTERPRET=0 (scripts/gpu_check.sh) the same tests run compiled on CUDA.
"""
import math
import os

import pytest
import torch

import kernels
from kernels.reference import (sdm_direction_reference, sdm_loss_reference, trl_direction_reference,
                               trl_loss_reference)
from kernels.sdm import sdm_loss_triton
from kernels.trl import trl_loss_triton

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SMALL_BLOCKS = (16, 16, 16, 4)          # several row/column tiles and D chunks at small shapes

LOSSES = {
    "sdm": (sdm_loss_triton, sdm_loss_reference, {"logit_scale": 50.0}),
    "trl": (trl_loss_triton, trl_loss_reference, {"tau": 0.015, "margin": 0.1}),
}


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
    """max |actual − expected| / max |expected| (float64, floor 1e-6 on the denominator)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-6))


def run_both(name, text, image, pids, weights=None, blocks=None, upstream=None):
    """Loss + input gradients of the Triton path and of the float64 reference on the same inputs."""
    triton_fn, reference_fn, kwargs = LOSSES[name]
    t, v = text.detach().clone().requires_grad_(), image.detach().clone().requires_grad_()
    loss = triton_fn(t, v, pids, weights=weights, blocks=blocks, **kwargs)
    upstream = torch.linspace(0.5, 1.5, len(pids), device=text.device) if upstream is None else upstream
    grads = torch.autograd.grad((loss * upstream).sum(), (t, v))
    t64, v64 = text.detach().double().requires_grad_(), image.detach().double().requires_grad_()
    w64 = None if weights is None else weights.double()
    ref = reference_fn(t64, v64, pids, weights=w64, **kwargs)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (t64, v64))
    return loss, grads, ref, ref_grads


@pytest.mark.parametrize("name", ["sdm", "trl"])
@pytest.mark.parametrize("batch,dim,n_pids,blocks", [
    (40, 40, 12, SMALL_BLOCKS),        # 3×3 tiles, D in 3 chunks, none a multiple of 16
    (33, 70, 33, (16, 32, 32, 4)),     # one positive per row (pids drawn from 33: mostly unique)
    (29, 24, 3, None),                 # many positives per row, default blocks
])
def test_triton_matches_float64_reference_fp32(name, batch, dim, n_pids, blocks):
    text, image, pids = random_batch(batch, dim, n_pids, seed=batch + dim)
    weights = torch.rand(batch, device=DEVICE) * (torch.arange(batch, device=DEVICE) % 5 != 0)  # zeros too
    loss, grads, ref, ref_grads = run_both(name, text, image, pids, weights, blocks)
    assert loss.dtype == torch.float32 and loss.shape == (batch,)
    assert relative_error(loss, ref) <= 1e-4
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        assert relative_error(grad, ref_grad) <= 1e-4
    assert torch.all(loss[weights == 0] == 0)


@pytest.mark.parametrize("name", ["sdm", "trl"])
def test_unique_pids_one_positive_per_row(name):
    text, image, _ = random_batch(20, 32, 20, seed=3)
    pids = torch.arange(20, device=DEVICE) * 7          # every row has only its own pair as positive
    loss, grads, ref, ref_grads = run_both(name, text, image, pids, blocks=SMALL_BLOCKS)
    assert relative_error(loss, ref) <= 1e-4
    assert all(relative_error(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("name", ["sdm", "trl"])
def test_batch_of_one(name):
    text, image, pids = random_batch(1, 12, 1, seed=5)
    loss, grads, ref, ref_grads = run_both(name, text, image, pids)
    assert torch.allclose(loss.double().cpu(), ref.detach().cpu(), atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.allclose(grad.double().cpu(), ref_grad.cpu(), atol=1e-6)


def test_trl_row_without_negatives_uses_margin_minus_positive_term():
    text, image, _ = random_batch(6, 16, 1, seed=11)
    pids = torch.zeros(6, dtype=torch.long, device=DEVICE)   # every column is a positive
    margin = 1.5                                             # > any Σ α S ≤ 1, so the hinge is active
    loss = trl_loss_triton(text, image, pids, margin=margin)
    t = torch.nn.functional.normalize(text.double(), dim=1)
    v = torch.nn.functional.normalize(image.double(), dim=1)
    sims = t @ v.t()
    expected = torch.zeros(6, dtype=torch.float64, device=DEVICE)
    for s in (sims, sims.t()):
        alpha = torch.softmax(s / 0.015, dim=1)
        expected += torch.relu(margin - (alpha * s).sum(dim=1))
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss).all()
    grads = torch.autograd.grad(trl_loss_triton(text.requires_grad_(), image, pids, margin=margin).sum(), text)
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("name", ["sdm", "trl"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 3e-2), (torch.bfloat16, 1.5e-1)])
def test_half_precision_inputs(name, dtype, tolerance):
    text, image, pids = random_batch(24, 48, 8, seed=17, dtype=dtype)
    loss, grads, ref, ref_grads = run_both(name, text, image, pids, blocks=SMALL_BLOCKS)
    assert loss.dtype == torch.float32
    assert grads[0].dtype == dtype
    assert relative_error(loss, ref) <= tolerance
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 4 * tolerance


@pytest.mark.parametrize("name", ["sdm", "trl"])
def test_distributed_rows_against_gathered_columns(name):
    """Concatenating the per-rank losses equals the full batch; summed gradients match too."""
    triton_fn, _, kwargs = LOSSES[name]
    text, image, pids = random_batch(30, 20, 9, seed=23)
    t_full, v_full = text.clone().requires_grad_(), image.clone().requires_grad_()
    full = triton_fn(t_full, v_full, pids, blocks=SMALL_BLOCKS, **kwargs)
    full_grads = torch.autograd.grad(full.sum(), (t_full, v_full))
    t, v = text.clone().requires_grad_(), image.clone().requires_grad_()
    per_rank = []
    for offset in (0, 12, 20):                    # uneven ranks: 12, 8 and 10 rows
        end = {0: 12, 12: 20, 20: 30}[offset]
        per_rank.append(triton_fn(t[offset:end], v[offset:end], pids[offset:end], blocks=SMALL_BLOCKS,
                                  text_cols=t, image_cols=v, col_pids=pids, **kwargs))
    joined = torch.cat(per_rank)
    grads = torch.autograd.grad(joined.sum(), (t, v))
    assert relative_error(joined, full) <= 1e-5
    for grad, full_grad in zip(grads, full_grads):
        assert relative_error(grad, full_grad) <= 1e-5
    # the reference agrees with the kernel on one rank
    ref = LOSSES[name][1](text[12:20].double(), image[12:20].double(), pids[12:20], text_cols=text.double(),
                          image_cols=image.double(), col_pids=pids, **kwargs)
    assert relative_error(per_rank[1], ref) <= 1e-4


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
    sims = torch.nn.functional.normalize(text, dim=1) @ torch.nn.functional.normalize(image, dim=1).t()
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
    rows = torch.nn.functional.normalize(text.detach(), dim=1).requires_grad_()
    cols = torch.nn.functional.normalize(image.detach(), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, c: sdm_direction_reference(r, c, shared_pids, shared_pids, 7.0), (rows, cols), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda r, c: trl_direction_reference(r, c, unique_pids, unique_pids, 0.5, 3.0), (rows, cols), fast_mode=True)


@pytest.mark.parametrize("loss_fn", [kernels.sdm_loss, kernels.trl_loss])
def test_reference_computes_in_float32_under_autocast(loss_fn):
    text, image, pids = random_batch(8, 16, 3, seed=53)
    plain = loss_fn(text, image, pids, backend="torch")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = loss_fn(text, image, pids, backend="torch")
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)


@pytest.mark.parametrize("name", ["sdm", "trl"])
def test_native_fp16_dot_path(name, monkeypatch):
    """The GPU path for fp16 feeds fp16 tiles (and the fp16-cast gradient tile) to tl.dot without the
    interpreter's float32 upcast; force that path here too (the interpreter's fp16 dot is sound,
    its bf16 dot is not, so bf16 native is only checked on a GPU)."""
    import kernels.sdm
    import kernels.trl
    def native_settings(dtype):
        return (True, "ieee") if dtype == torch.float32 else (False, "tf32")

    for module in (kernels.sdm, kernels.trl):
        monkeypatch.setattr(module, "dot_settings", native_settings)
    text, image, pids = random_batch(24, 48, 8, seed=19, dtype=torch.float16)
    loss, grads, ref, ref_grads = run_both(name, text, image, pids, blocks=SMALL_BLOCKS)
    assert relative_error(loss, ref) <= 3e-3
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 1e-2
