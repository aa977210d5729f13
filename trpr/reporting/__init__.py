"""The reporting layer: every figure and table the project writes, drawn from records others produce.

    training     curves.png and alr_weights.png of a training run, from its epoch records (metrics.jsonl)
    evaluation   eval_3rtpr.py's reports: results.json, leaderboard.md, the CMC plot, seed groups
    leaderboard  leaderboard rows (ours, seed mean ± std, published) as Markdown
    cmc          the CMC figure
    ablation     the ablation sweep's tables and figures, the ALR separability table and loss histograms
    proxy        the proxy CLIP's pre-training loss curve and its attention figure

The engine, the evaluation and the experiments (`trpr.experiments`) compute; they or their callers ask
this layer to draw.
The metric maths (CMC, published numbers, the HF `evaluate` module) is `trpr.metrics`.
"""
