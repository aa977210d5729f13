"""Time evaluation from features at benchmark size (default: CUHK-PEDES test, 6,156 queries × 3,074 images).

    python -m metrics.bench_retrieval [--queries 6156] [--gallery 3074] [--ids 1000] [--repeats 3]

Random features with CUHK-like identities (each id owns ~3 gallery images; each image has 2 captions).
Times, on whatever device `--device` names (default: cpu):
  1. kernels.retrieval_metrics on one row, D = 512 (one model's GE);
  2. the same on the 4-piece ensemble A+B/GE+FS (2 models × (512 global + 2048 fused) = 5,120 dims);
  3. all 9 text->image rows of a pair (eval_3rtpr.score_pair_features, per-query outputs for CMC).
Reports the median wall time over `--repeats` runs, in seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def random_pair_features(num_queries: int, num_gallery: int, num_ids: int, embed_dim: int = 512,
                         fused_dim: int = 2048, device: str = "cpu", seed: int = 0):
    """eval_3rtpr.PairFeatures of random fp32 features with CUHK-like pids: gallery item i has pid
    i * num_ids // num_gallery; query j describes gallery item j * num_gallery // num_queries."""
    from eval_3rtpr import PairFeatures

    generator = torch.Generator().manual_seed(seed)
    gallery_pids = torch.arange(num_gallery) * num_ids // num_gallery
    query_pids = gallery_pids[torch.arange(num_queries) * num_gallery // num_queries]

    def outputs(n):
        return [(torch.randn(n, embed_dim, generator=generator).to(device),
                 torch.randn(n, fused_dim, generator=generator).to(device)) for _ in range(2)]

    return PairFeatures(image_outputs=outputs(num_gallery), text_outputs=outputs(num_queries),
                        gallery_pids=gallery_pids.to(device), query_pids=query_pids.to(device))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=6156)
    parser.add_argument("--gallery", type=int, default=3074)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import kernels
    import modeling
    from eval_3rtpr import score_pair_features

    features = random_pair_features(args.queries, args.gallery, args.ids, device=args.device)
    one_query = modeling.scoring_features([features.text_outputs[0]], "GE")
    one_gallery = modeling.scoring_features([features.image_outputs[0]], "GE")
    ensemble_query = modeling.scoring_features(features.text_outputs, "GE+FS")
    ensemble_gallery = modeling.scoring_features(features.image_outputs, "GE+FS")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.queries} queries × {args.gallery} gallery, {args.ids} ids")
    seconds, result = _timed(lambda: kernels.retrieval_metrics(one_query, one_gallery, features.query_pids,
                                                               features.gallery_pids), args.repeats)
    print(f"retrieval_metrics, one row, D={one_query.shape[1]}: {seconds:.3f} s (R1 {float(result['R1']):.2f})")
    seconds, result = _timed(lambda: kernels.retrieval_metrics(ensemble_query, ensemble_gallery, features.query_pids,
                                                               features.gallery_pids), args.repeats)
    print(f"retrieval_metrics, A+B/GE+FS, D={ensemble_query.shape[1]}: {seconds:.3f} s (R1 {float(result['R1']):.2f})")
    seconds, _ = _timed(lambda: score_pair_features(features, per_query=True, show_progress=False), args.repeats)
    print(f"score_pair_features, 9 text->image rows with per-query outputs: {seconds:.3f} s")


if __name__ == "__main__":
    main()
