"""The shared runtime: the floor under both engines (training `engine` and `evaluation`), and under
`data`, `modeling`, `reporting` and `experiments` too. It imports nothing else of trpr.

    atomic      write to a temporary beside the target, then rename (files and folders); fsync helpers
    cache       the one cache root ($TRPR_CACHE, else ~/.cache/3rtpr) and its sub-folders
    run_folder  the run folder's layout (file and folder names), its lock, recovery of an interrupted swap
    sharding    each process's share of N items (shard_indices) and the gather of the shares
    encoding    the one sharded encoder (`encode`: images or texts, any models, chosen pieces, dtype,
                L2-normalisation), eval_mode, model_device
    progress    progress bars quiet in non-interactive logs
    errors      first_line(error): the one-line form of an error message

Modules are imported by name (`from trpr.runtime.atomic import atomic_path`); this file imports none of
them, so that a light module (cache, atomic) does not pull in torch.
"""
