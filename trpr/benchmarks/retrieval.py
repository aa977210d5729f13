"""Time evaluation from features at benchmark size (default: CUHK-PEDES test, 6,156 queries × 3,074 images).

    python -m trpr.benchmarks.retrieval [--queries 6156] [--gallery 3074] [--ids 1000] [--repeats 3] [--device cpu]

Random features with CUHK-like identities (each id owns ~3 gallery images; each image has 2 captions).
Times, on whatever device `--device` names, with `benchmarks.timing.time_call` (median / fastest ms):
  1. kernels.retrieval_metrics on one row, D = 512 (one model's GE);
  2. the same on the 4-piece ensemble A+B/GE+FS (2 models × (512 global + 2048 fused) = 5,120 dims);
  3. all 9 text->image rows of a pair (evaluation.score_pair_features, per-query outputs for CMC).
"""
from __future__ import annotations

import argparse

import torch

from trpr import kernels
from trpr import modeling
from trpr.benchmarks.timing import device_name, time_call
from trpr.evaluation import PairFeatures, score_pair_features


def random_pair_features(num_queries: int, num_gallery: int, num_ids: int, embed_dim: int = 512,
                         fused_dim: int = 2048, device: str = "cpu", seed: int = 0) -> PairFeatures:
    """evaluation.PairFeatures of random fp32 features with CUHK-like pids: gallery item i has pid
    i * num_ids // num_gallery; query j describes gallery item j * num_gallery // num_queries."""
    generator = torch.Generator().manual_seed(seed)
    gallery_pids = torch.arange(num_gallery) * num_ids // num_gallery
    query_pids = gallery_pids[torch.arange(num_queries) * num_gallery // num_queries]

    def outputs(n):
        return [(torch.randn(n, embed_dim, generator=generator).to(device),
                 torch.randn(n, fused_dim, generator=generator).to(device)) for _ in range(2)]

    return PairFeatures(image_outputs=outputs(num_gallery), text_outputs=outputs(num_queries),
                        gallery_pids=gallery_pids.to(device), query_pids=query_pids.to(device))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=6156)
    parser.add_argument("--gallery", type=int, default=3074)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    features = random_pair_features(args.queries, args.gallery, args.ids, device=args.device)
    one_query = modeling.scoring_features([features.text_outputs[0]], "GE")
    one_gallery = modeling.scoring_features([features.image_outputs[0]], "GE")
    ensemble_query = modeling.scoring_features(features.text_outputs, "GE+FS")
    ensemble_gallery = modeling.scoring_features(features.image_outputs, "GE+FS")
    print(f"{device_name(device)}, {args.queries} queries × {args.gallery} gallery, {args.ids} ids")
    cases = {
        f"retrieval_metrics, one row, D={one_query.shape[1]}": lambda: kernels.retrieval_metrics(
            one_query, one_gallery, features.query_pids, features.gallery_pids),
        f"retrieval_metrics, A+B/GE+FS, D={ensemble_query.shape[1]}": lambda: kernels.retrieval_metrics(
            ensemble_query, ensemble_gallery, features.query_pids, features.gallery_pids),
        "score_pair_features, 9 text->image rows with per-query outputs": lambda: score_pair_features(
            features, per_query=True, show_progress=False),
    }
    timings = {}
    for label, call in cases.items():
        timings[label] = time_call(call, device, args.repeats)
        print(f"{label}: {timings[label]['ms']:.1f} ms (fastest {timings[label]['min_ms']:.1f} ms)")
    return timings


if __name__ == "__main__":
    main()
