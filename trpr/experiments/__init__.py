"""Experiments built on the library, importable (`python -m trpr.experiments.<module>`; the thin command
lines in scripts/ call these modules):

    proxy_pretrain   pre-training the proxy CLIP on the synthetic web-photo corpus (trpr.data.proxy_corpus),
                     cached under $TRPR_CACHE (scripts/pretrain_proxy.py, `make proxy`)
    proxy_attention  where the last-layer CLS attention looks: person vs background (scripts/proxy_attention.py)
    ablation_plan    the ablation sweep's variants, conditions, runs and trainer command lines
    ablation_sweep   the sweep's command line: trains the runs, evaluates the ensemble controls
                     (scripts/ablate.py)
    ablation_zeroshot  the sweep's zero-shot row: the pretrained backbone evaluated once, untouched
    ablation_compare the two model-selection rules (trainer's, reference max(GE, FS)) and the paired
                     per-component comparisons with their verdict
    ablation_report  the sweep's report: test metrics and ALR records collected, ablation.md / .json
    alr_analysis     ALR separability of trained runs (scripts/ablate.py --diagnose)

Every table and figure they write is drawn by `trpr.reporting` (ablation, proxy).
"""
