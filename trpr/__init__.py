"""3rtpr's library: text-based person retrieval with 3RTPR on CLIP.

One import package (docs/decisions.md, "One import package"); its sub-packages, bottom to top:

    trpr.kernels      Triton kernels + autograd for the SDM / TRL losses and retrieval metrics, with references
    trpr.modeling     CLIP backbone, fused heads, TRPRModel, ReciprocalPair, losses, ALR maths, Hub helpers
    trpr.data         the three benchmarks and synth-pedes as `datasets.DatasetDict`, noise, transforms, checks
    trpr.configs      the YAML recipes (``--config cuhk-pedes``) and their loader
    trpr.metrics      CMC maths, published numbers, the `evaluate` metric module
    trpr.engine       training: step, ALR pass, validation, checkpoints, timing (emits records, draws nothing)
    trpr.evaluation   evaluation rows, checkpoint resolution, search
    trpr.reporting    every figure and table: training curves, ALR history, CMC, leaderboard, ablation, proxy
    trpr.experiments  the proxy CLIP's pre-training, its attention analysis, the ablation sweep and its analysis
    trpr.benchmarks   kernel, retrieval, encoder and training-throughput benchmarks

The entry scripts `train_3rtpr.py` and `eval_3rtpr.py` sit beside this package, not in it.
Importing `trpr` imports nothing heavy: each sub-package is imported on its own.
"""
__version__ = "0.1.0"
