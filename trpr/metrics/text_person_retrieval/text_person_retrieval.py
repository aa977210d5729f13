"""Text-based person retrieval metrics (R@K, mAP, mINP) as a local Hugging Face `evaluate` module.

Load it offline from the repository:  ``evaluate.load("trpr/metrics/text_person_retrieval")``.
The numbers come from ``kernels.retrieval_metrics`` (features) or
``kernels.retrieval_metrics_from_scores`` (a similarity matrix), i.e. exactly the project's
evaluation protocol (docs/method.md §8, from IRRA).
"""

import datasets
import evaluate

_DESCRIPTION = """\
Text->image person retrieval metrics. For each query (a caption) the gallery (pedestrian images)
is ranked by similarity, descending; ties rank by gallery index. A gallery item matches when it has
the query's person id. R@K = % of queries with a match in the top K; AP = mean over the query's
matches of the precision at each match's rank, mAP = mean AP; INP = (#matches) / (rank of the last
match), mINP = mean INP. All in percent. Image->text is the same with the roles swapped.
"""

_KWARGS_DESCRIPTION = """\
Two input modes.

Features (the ranking score is the dot product; pass L2-normalised or concatenated
`modeling.scoring_features` rows):
    predictions:   one feature vector [D] per query.
    references:    the query's person id (int).
    gallery_feats: array [Ng, D] of gallery features (compute() keyword).
    gallery_pids:  array [Ng] of gallery person ids (compute() keyword).

Similarity matrix:
    predictions:   one row of similarities [Ng] per query (higher = better).
    references:    the query's person id (int).
    gallery_pids:  array [Ng] of gallery person ids (compute() keyword). No gallery_feats.

Other compute() keywords:
    ks:        ranks K for R@K (default (1, 5, 10)).
    per_query: also return per-query lists "AP", "INP" (fractions, NaN for a query without a match)
               and "first_rank" (1-based, 0 when the gallery holds no match).
    backend:   "auto" | "torch" | "triton" (feature mode; see kernels.retrieval_metrics).

Returns: {"R1", "R5", "R10", "mAP", "mINP"} in percent (one "R<k>" per k).

Example:
    >>> metric = evaluate.load("trpr/metrics/text_person_retrieval")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], gallery_pids=[0, 1])
    {'R1': 100.0, 'R5': 100.0, 'R10': 100.0, 'mAP': 100.0, 'mINP': 100.0}
"""

_CITATION = """\
@Article{Nguyen25TIP,
  author  = {Anh D. Nguyen and Hoa N. Nguyen},
  title   = {Enhancing Text-Based Person Retrieval by Combining Fused Representation and Reciprocal
             Learning With Adaptive Loss Refinement},
  journal = {IEEE Transactions on Image Processing}, year = {2025}, volume = {34}, pages = {5147--5157}
}
"""


def _import_kernels():
    """The project's `kernels` package (imported lazily: `evaluate` checks top-level imports). `evaluate`
    runs a copy of this script from its modules cache, so the project must be importable: installed
    (`pip install -e .`) or run from the repository root."""
    try:
        from trpr import kernels
    except ImportError as error:
        raise ImportError("text_person_retrieval needs the 3rtpr project's `kernels` package: install the project "
                          "(`pip install -e .` in the repository) or run from the repository root") from error
    return kernels


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TextPersonRetrieval(evaluate.Metric):
    """R@K / mAP / mINP for text-based person retrieval, backed by kernels.retrieval_metrics."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Value("int64"),
            }),
            reference_urls=["https://doi.org/10.1109/TIP.2025.3594880"],
        )

    def _compute(self, predictions, references, gallery_feats=None, gallery_pids=None,
                 ks=(1, 5, 10), per_query=False, backend="auto"):
        import torch

        kernels = _import_kernels()
        if gallery_pids is None:
            raise ValueError("text_person_retrieval: compute() needs gallery_pids (one person id per gallery item)")
        query_rows = torch.as_tensor(predictions, dtype=torch.float32)
        query_pids = torch.as_tensor(references, dtype=torch.int64)
        gallery_pids = torch.as_tensor(gallery_pids, dtype=torch.int64).reshape(-1)
        if query_rows.ndim != 2:
            raise ValueError(f"text_person_retrieval: predictions must be 2-D [Nq, *], got shape {tuple(query_rows.shape)}")
        ks = tuple(int(k) for k in ks)
        if gallery_feats is None:
            if query_rows.shape[1] != gallery_pids.numel():
                raise ValueError(
                    f"text_person_retrieval: similarity rows have {query_rows.shape[1]} columns but "
                    f"gallery_pids has {gallery_pids.numel()} entries")
            result = kernels.retrieval_metrics_from_scores(query_rows, query_pids, gallery_pids, ks=ks,
                                                           per_query=per_query)
        else:
            gallery_feats = torch.as_tensor(gallery_feats, dtype=torch.float32)
            if gallery_feats.ndim != 2 or gallery_feats.shape[1] != query_rows.shape[1]:
                raise ValueError(
                    f"text_person_retrieval: gallery_feats must be [Ng, {query_rows.shape[1]}], "
                    f"got shape {tuple(gallery_feats.shape)}")
            if gallery_feats.shape[0] != gallery_pids.numel():
                raise ValueError(
                    f"text_person_retrieval: gallery_feats has {gallery_feats.shape[0]} rows but "
                    f"gallery_pids has {gallery_pids.numel()} entries")
            result = kernels.retrieval_metrics(query_rows, gallery_feats, query_pids, gallery_pids, ks=ks,
                                               per_query=per_query, backend=backend)
        return {key: (value.tolist() if torch.is_tensor(value) else float(value)) for key, value in result.items()}
