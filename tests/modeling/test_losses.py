"""modeling.losses (SDMLoss / TRLLoss / TrainingLoss: gather, kernel, reduction) and the BatchNorm with an
injected statistics reduction, in one process and across 2 CPU processes (gloo) against one process on
the global batch."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from trpr import kernels
from trpr.modeling.collectives import all_reduce_sum
from trpr.modeling.fused import MaskedBatchNorm1d
from trpr.modeling.losses import SDMLoss, TRLLoss, TrainingLoss

LOSS_CFG = {"lambda_sdm": 0.7, "lambda_trl": 1.3, "logit_scale": 50.0, "tau": 0.015, "margin": 0.1}
WORLD_SIZE = 2


def _batch(size=8, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(size, dim, generator=generator)
    image = torch.randn(size, dim, generator=generator)
    pids = torch.arange(size) // 2
    weights = torch.rand(size, generator=generator)
    keep = torch.rand(size, generator=generator) > 0.3
    return text, image, pids, weights, keep


def test_terms_call_their_kernel_and_reduce_over_kept_samples():
    text, image, pids, weights, keep = _batch()
    sdm, trl = SDMLoss(logit_scale=30.0, weight=0.5), TRLLoss(tau=0.02, margin=0.2, weight=2.0)
    torch.testing.assert_close(sdm.per_sample(text, image, pids), kernels.sdm_loss(text, image, pids, 30.0))
    torch.testing.assert_close(trl.per_sample(text, image, pids, weights),
                               kernels.trl_loss(text, image, pids, 0.02, 0.2, weights))
    h = keep.float()
    sdm_per_sample = kernels.sdm_loss(text, image, pids, 30.0)
    expected = sdm.weight * (h * weights * sdm_per_sample).sum() / h.sum()  # SDM: λ Σ h w ℓ / Σ h
    torch.testing.assert_close(sdm(text, image, pids, weights, keep), expected)
    torch.testing.assert_close(sdm(text, image, pids), sdm.weight * sdm_per_sample.mean())
    none_kept = torch.zeros_like(keep)
    assert float(sdm(text, image, pids, weights, none_kept)) == 0.0  # Σ h clamped to 1: no division by 0


def test_trl_is_summed_over_the_batch_sdm_averaged_over_kept_samples():
    """docs/method.md §3: TRL is Σ h w ℓ (RDE, the reference), SDM Σ h w ℓ / Σ h; the difference is a
    factor Σ h, which Adam with eps 1e-3 does not absorb."""
    text, image, pids, weights, keep = _batch(size=12, seed=3)
    h = keep.float()
    trl = TRLLoss(tau=0.02, margin=0.2, weight=2.0)
    per_sample = kernels.trl_loss(text, image, pids, 0.02, 0.2)
    torch.testing.assert_close(trl(text, image, pids, weights, keep), 2.0 * (h * weights * per_sample).sum())
    torch.testing.assert_close(trl(text, image, pids), 2.0 * per_sample.sum())
    assert float(trl(text, image, pids, weights, torch.zeros_like(keep))) == 0.0
    both = TrainingLoss.from_config(LOSS_CFG)
    sdm_part = LOSS_CFG["lambda_sdm"] * (h * weights * kernels.sdm_loss(text, image, pids)).sum() / h.sum()
    trl_part = LOSS_CFG["lambda_trl"] * (h * weights * kernels.trl_loss(text, image, pids)).sum()
    torch.testing.assert_close(both(text, image, pids, weights, keep), sdm_part + trl_part)


def test_training_loss_sums_the_enabled_terms():
    text, image, pids, weights, keep = _batch(seed=1)
    both = TrainingLoss.from_config(LOSS_CFG)
    assert [term.name for term in both.terms] == ["sdm", "trl"] and both.alr_term.name == "sdm"
    sdm, trl = both.terms
    torch.testing.assert_close(both(text, image, pids, weights, keep),
                               sdm(text, image, pids, weights, keep) + trl(text, image, pids, weights, keep))
    only_trl = TrainingLoss.from_config(dict(LOSS_CFG, lambda_sdm=0.0))
    assert [term.name for term in only_trl.terms] == ["trl"] and only_trl.alr_term.name == "trl"
    with pytest.raises(ValueError, match="at least one term"):
        TrainingLoss.from_config(dict(LOSS_CFG, lambda_sdm=0.0, lambda_trl=0.0))
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        SDMLoss(rank=2, world_size=2)


def test_batch_norm_reduction_is_injected_in_training_only():
    torch.manual_seed(0)
    tokens, valid = torch.randn(3, 4, 6), torch.rand(3, 4) > 0.3
    plain, doubled = MaskedBatchNorm1d(6), MaskedBatchNorm1d(6, reduce_statistics=lambda sums: 2 * sums)
    # doubling every sum (two identical processes) leaves mean and variance unchanged, but is called
    calls = []
    doubled.reduce_statistics = lambda sums: calls.append(sums.shape) or 2 * sums
    for mask in (valid, None):
        torch.testing.assert_close(doubled(tokens, mask), plain(tokens, mask))
    assert calls == [(7,), (6,), (7,), (6,)]
    torch.testing.assert_close(doubled.running_mean, plain.running_mean)
    plain.load_state_dict(doubled.state_dict())  # running_var differs: the unbiased correction saw 2x tokens
    plain.eval(), doubled.eval()
    torch.testing.assert_close(doubled(tokens, valid), plain(tokens, valid))
    assert len(calls) == 4  # eval mode: running statistics, no reduction


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, out_dir: str, port: int) -> None:
    """One of 2 processes: its half of the global batch through TrainingLoss and the synced BatchNorm."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    text, image, pids, weights, keep = _batch()
    rows = slice(rank * 4, rank * 4 + 4)
    text, image = text[rows].clone().requires_grad_(), image[rows].clone().requires_grad_()
    loss = TrainingLoss.from_config(LOSS_CFG, rank=rank, world_size=WORLD_SIZE)
    share = loss(text, image, pids[rows], weights[rows], keep[rows])
    share.backward()
    torch.manual_seed(0)
    tokens = torch.randn(8, 5, 6)[rows].requires_grad_()
    norm = MaskedBatchNorm1d(6, reduce_statistics=all_reduce_sum)
    normed = norm(tokens)
    (normed ** 3).sum().backward()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "share": float(share), "text_grad": text.grad.tolist(), "image_grad": image.grad.tolist(),
        "normed": normed.tolist(), "token_grad": tokens.grad.tolist(), "running_var": norm.running_var.tolist()}))
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    torch.multiprocessing.start_processes(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD_SIZE,
                                          start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    text, image, pids, weights, keep = _batch()
    text.requires_grad_(), image.requires_grad_()
    whole = TrainingLoss.from_config(LOSS_CFG)(text, image, pids, weights, keep)
    whole.backward()
    assert sum(r["share"] for r in ranks) == pytest.approx(whole.item(), rel=1e-5)
    # DDP averages gradients over processes and the trainer scales by world_size: the sum is the gradient
    for name, full in (("text_grad", text.grad), ("image_grad", image.grad)):
        gathered = torch.cat([torch.tensor(r[name]) for r in ranks])
        torch.testing.assert_close(gathered, full, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    tokens = torch.randn(8, 5, 6).requires_grad_()
    norm = MaskedBatchNorm1d(6)
    normed = norm(tokens)
    (normed ** 3).sum().backward()
    torch.testing.assert_close(torch.cat([torch.tensor(r["normed"]) for r in ranks]), normed.detach(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([torch.tensor(r["token_grad"]) for r in ranks]), tokens.grad,
                               rtol=1e-4, atol=1e-4)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["running_var"]), norm.running_var, rtol=1e-5, atol=1e-6)


def _trl_by_hand(text, image, tau, margin):
    """TRL with distinct pids, written out: per sample, both directions of [m - S_ii + τ log Σ_{j≠i} exp(S_ij / τ)]₊."""
    sims = torch.nn.functional.normalize(text.double(), dim=-1) @ torch.nn.functional.normalize(image.double(), dim=-1).T
    total = torch.zeros(len(sims), dtype=torch.float64)
    for matrix in (sims, sims.T):
        for i in range(len(sims)):
            negatives = torch.cat([matrix[i, :i], matrix[i, i + 1:]])
            total[i] += max(0.0, margin - matrix[i, i] + tau * torch.logsumexp(negatives / tau, 0))
    return total


def test_trl_temperature_reference_trains_with_the_margin_and_scores_alr_with_tau():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    text = base + 0.2 * torch.randn(4, 4, generator=generator)   # similar rows: every hinge is active
    image = base + 0.2 * torch.randn(4, 4, generator=generator)
    pids = torch.arange(4)
    config = {"lambda_sdm": 0.0, "lambda_trl": 1.0, "logit_scale": 50.0, "tau": 0.015, "margin": 0.1}
    project = TrainingLoss.from_config({**config, "trl_temperature": "tau"}, backend="torch")
    reference = TrainingLoss.from_config({**config, "trl_temperature": "reference"}, backend="torch")
    with_tau, with_margin = _trl_by_hand(text, image, 0.015, 0.1), _trl_by_hand(text, image, 0.1, 0.1)
    assert (with_tau > 0).all() and not torch.allclose(with_tau, with_margin)
    torch.testing.assert_close(project(text, image, pids).double(), with_tau.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference(text, image, pids).double(), with_margin.sum(), rtol=1e-5, atol=1e-6)
    # the ALR pass scores TRL with tau under both settings
    for loss in (project, reference):
        torch.testing.assert_close(loss.alr_term.per_sample(text, image, pids).double(), with_tau, rtol=1e-5, atol=1e-6)
    # with SDM trained, SDM stays the ALR term; a recipe without the key keeps tau
    both = TrainingLoss.from_config({**config, "lambda_sdm": 1.0, "trl_temperature": "reference"}, backend="torch")
    assert isinstance(both.alr_term, SDMLoss) and both.terms[1].tau == 0.1
    assert TrainingLoss.from_config(config).terms[0].tau == 0.015
