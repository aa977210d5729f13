"""The reporting layer: every figure and table the project writes, drawn from records others produce.

    training     curves.png and alr_weights.png of a training run, from its epoch records (metrics.jsonl)
    evaluation   eval_3rtpr.py's reports: results.json, leaderboard.md, the CMC plot, seed groups
    leaderboard  leaderboard rows (ours, seed mean ± std, published) as Markdown
    cmc          the CMC figure

The engine and the evaluation compute; their callers ask this layer to draw.
The metric maths (CMC, published numbers, the HF `evaluate` module) is `trpr.metrics`.
"""
