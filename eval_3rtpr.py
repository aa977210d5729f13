"""Evaluate 3RTPR checkpoints: retrieval metrics, leaderboard, CMC curves and free-text search.

Evaluation (docs/method.md §5, §8, §9):
    python eval_3rtpr.py [evaluate] --checkpoint RUN_DIR [RUN_DIR ...] --dataset NAME [--root ROOT]
                         [--split test] --out DIR [--i2t] [--leaderboard] [--batch-size N]
    (also under `accelerate launch`: feature extraction is sharded over the processes)
Free-text search, in a benchmark's gallery or in any folder of images (indexed once, kept up to date):
    python eval_3rtpr.py search "a man in a blue jacket" --checkpoint RUN_DIR --dataset NAME [--root ROOT]
                         [--split test] [--top 10] [--out DIR]      (QUERY "-": one query per stdin line)
    python eval_3rtpr.py search "a man in a blue jacket" --checkpoint RUN_DIR --gallery PHOTOS_DIR [--top 10]
Installed, `3rtpr-eval` is the same command.

For every checkpoint the rows are GE, FS and GE+FS for model A, model B and the ensemble A+B
(`trpr/evaluation/`, reports by `trpr.reporting`). Bad input (a checkpoint folder missing files, an unknown
dataset, an empty split, ...) ends with a one-line error on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from trpr.evaluation import (EvalInputError, build_gallery_index, check_gallery_folder, evaluate_checkpoint,
                             folder_cache_stem, load_eval_split, load_gallery_index, load_pair, resolve_checkpoint,
                             save_gallery_index, save_search_grid, search_cache_dir, search_cache_key, search_gallery,
                             search_grid_path, update_folder_index, warn_unreadable)
from trpr.evaluation.ann_index import ANN_THRESHOLD, INDEX_MODES, searcher_for, searcher_for_folder
from trpr.evaluation.folder_gallery import IMAGE_EXTENSIONS
from trpr.evaluation.checkpoints import unreadable_images_as_input_errors
from trpr.runtime.progress import quiet_progress_in_logs
from trpr.evaluation.search import DEFAULT_SEARCH_ROW, choose_search_row, parse_score_row
from trpr.kernels import NonFiniteFeatures
from trpr.reporting.evaluation import make_names_unique, write_reports
from trpr.modeling.pair import ROW_KEYS

PROG = "eval_3rtpr.py"
COMMANDS = ("evaluate", "search")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
MAX_TOP = 100  # the grid draws every match: 100 is a 10 x 10 PNG


def build_parser() -> argparse.ArgumentParser:
    """The command line: subcommands `evaluate` (the default when none is named) and `search`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{evaluate,search}")
    evaluate = commands.add_parser(
        "evaluate", help="evaluate checkpoints (the default command)",
        description="Evaluate 3RTPR checkpoints (rows A/B/A+B × GE/FS/GE+FS).")
    evaluate.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN_DIR",
                          help="run folder(s) (best/, else last/), ReciprocalPair folder(s) or Hub repo id(s); several seeds of "
                               "one config also get a mean ± std row")
    evaluate.add_argument("--dataset", required=True,
                          help="cuhk-pedes | icfg-pedes | rstpreid | synth-pedes[-tiny|-small|-full] | folder "
                               "(a custom dataset: --root is its folder)")
    evaluate.add_argument("--root", default=None, help="datasets root (default: data.load_benchmark's default)")
    evaluate.add_argument("--split", default="test", help="evaluation split (default: test)")
    evaluate.add_argument("--out", required=True, type=Path,
                          help="output folder for results.json, leaderboard.md, CMC PNG")
    evaluate.add_argument("--i2t", action="store_true", help="also evaluate image -> text")
    evaluate.add_argument("--leaderboard", action="store_true",
                          help="place our rows among the published results (docs/method.md §9), sorted by R@1")
    evaluate.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    evaluate.add_argument("--num-workers", type=int, default=0,
                          help="DataLoader workers for decoding images (default: 0)")

    search = commands.add_parser("search", help="free-text person search in an evaluation gallery or a folder of images",
                                 description="Free-text person search in an evaluation gallery (--dataset) or in "
                                             "any folder of images (--gallery).")
    search.add_argument("query", help="a description of the person, e.g. \"a man in a blue jacket with a black "
                                      "backpack\"; \"-\" reads one query per line from stdin")
    search.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run folder, ReciprocalPair folder or Hub repo id")
    where = search.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", help="benchmark (or folder: a custom dataset) whose gallery is searched")
    where.add_argument("--gallery", type=Path, metavar="DIR",
                       help=f"a folder of images, searched recursively ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
                            "indexed once in the cache and updated when files are added, changed or removed")
    search.add_argument("--root", default=None, help="datasets root (default: data.load_benchmark's default; "
                                                     "with --dataset only)")
    search.add_argument("--split", default="test", help="gallery split (default: test; with --dataset only)")
    search.add_argument("--top", type=int, default=10,
                        help=f"number of matches, 1..{MAX_TOP} (default: 10; all are drawn in the PNG grid)")
    search.add_argument("--out", type=Path, default=Path("search-results"),
                        help="folder for the PNG grid (default: ./search-results)")
    search.add_argument("--score", default=None,
                        help=f"ranking row, one of {', '.join(ROW_KEYS)} (default: the row the run was selected on, "
                             f"its config's eval.select_row; without a run config {DEFAULT_SEARCH_ROW})")
    search.add_argument("--batch-size", type=int, default=64, help="encoder batch size when the gallery is encoded")
    search.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the models encode (default auto: CUDA when available, else the CPU)")
    search.add_argument("--index", choices=INDEX_MODES, default="auto",
                        help=f"exact: score every gallery image; ann: FAISS candidates re-scored exactly with the "
                             f"row's full features (approximate); auto (default): ann above {ANN_THRESHOLD:,} images")
    search.add_argument("--cache-dir", type=Path, default=None,
                        help="gallery feature cache, folder galleries included (default: $TRPR_CACHE/search-features "
                             "or ~/.cache/3rtpr/search-features)")
    return parser


def writable_folder(path: Path, option: str) -> Path:
    """Check, before any work, that the outputs can be written to `path` (a folder, or one that can be
    created: its nearest existing parent is a writable folder); nothing is created here. EvalInputError
    naming the option and the path otherwise."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"lies under {existing}, which is a file"
        raise EvalInputError(f"{option} {path}: {what}; name a folder for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (in {existing}, where it would be created)"
        raise EvalInputError(f"{option} {path}: cannot write there{where}: permission denied or a read-only file "
                             "system; name a writable folder")
    return path


def evaluate_command(args: argparse.Namespace) -> int:
    """`eval_3rtpr.py [evaluate] --checkpoint ...`: evaluate, write the reports, print the table (main process)."""
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    writable_folder(args.out, "--out")
    from accelerate import Accelerator

    from trpr.data.tokenizer import get_tokenizer

    accelerator = Accelerator()
    checkpoints = [resolve_checkpoint(path) for path in args.checkpoint]
    gallery, queries = load_eval_split(args.dataset, args.root, args.split)
    tokenizer = get_tokenizer()
    results = []
    for checkpoint in checkpoints:
        result = evaluate_checkpoint(checkpoint, gallery, queries, tokenizer=tokenizer, batch_size=args.batch_size,
                                     accelerator=accelerator, i2t=args.i2t, num_workers=args.num_workers)
        results.append(result)
        if accelerator.is_main_process:
            print(f"{checkpoint.name}: {len(queries)} queries × {len(gallery)} gallery images, features "
                  f"{result.seconds['feature_extraction']:.1f} s, metrics {result.seconds['metrics']:.2f} s",
                  file=sys.stderr)
    if accelerator.is_main_process:
        make_names_unique(results)
        paths = write_reports(results, dataset=args.dataset, split=args.split, root=args.root, out_dir=args.out,
                              with_published=args.leaderboard, i2t=args.i2t)
        print(paths["leaderboard"].read_text())
        print(f"wrote {paths['results']}, {paths['leaderboard']}, {paths['cmc']}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 0


def _read_queries(query: str):
    """The query itself, or with "-" one query per non-empty stdin line (answered as they come)."""
    if query != "-":
        yield query
        return
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


search_row = choose_search_row  # (row, why): --score, else the run's eval.select_row, else DEFAULT_SEARCH_ROW


def search_device(name: str):
    """torch.device of `search --device`: auto = CUDA when available, else the CPU; "cuda" without a device
    is a one-line input error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("search --device cuda: no CUDA device is available")
    return torch.device(name)


def search_command(args: argparse.Namespace) -> int:
    """`eval_3rtpr.py search QUERY ...`: print the top matches and save a PNG grid per query."""
    if not args.query.strip():
        raise EvalInputError("search: the query is empty")
    if not 1 <= args.top <= MAX_TOP:
        raise EvalInputError(f"--top must be between 1 and {MAX_TOP} (every match is drawn in the grid), got {args.top}")
    if args.score is not None:
        parse_score_row(args.score)
    from trpr.data.tokenizer import get_tokenizer

    started = time.perf_counter()
    if args.gallery is not None and args.root is not None:
        raise EvalInputError("--root names a datasets root for --dataset; a --gallery folder needs none")
    writable_folder(args.out, "--out")
    folder = check_gallery_folder(args.gallery) if args.gallery is not None else None
    checkpoint = resolve_checkpoint(args.checkpoint)
    row, why = search_row(args.score, checkpoint)
    print(f"ranking with {row} ({why})", file=sys.stderr)
    if folder is not None:
        pair = load_pair(checkpoint)
        index, gallery = load_folder_gallery(pair, checkpoint, folder, args), None
    else:
        pair, index, gallery = load_benchmark_gallery(checkpoint, args, started)
    ann = args.ann_searcher(index)
    if ann is not None:
        print(f"approximate index: {ann.store.dir} ({'built' if ann.rebuilt else 'read'}; nlist {ann.params.nlist}, "
              f"nprobe {ann.params.nprobe}, {ann.params.candidates} candidates re-scored exactly)", file=sys.stderr)
    tokenizer = get_tokenizer()
    for query in _read_queries(args.query):
        query_started = time.perf_counter()
        warn_truncated(tokenizer, query)
        try:
            matches = search_gallery(pair, index, query, tokenizer=tokenizer, row=row, top=args.top, ann=ann)
        except NonFiniteFeatures as error:  # a diverged pair is an error, never a ranking
            raise EvalInputError(f"checkpoint {checkpoint.path}: {error}") from None
        check_matches_exist(matches, folder, args)
        answered = time.perf_counter()
        print(f"query: {query}")
        if folder is not None:
            print(f"{'rank':>4}  {'score':>7}  file")
            for match in matches:
                print(f"{match['rank']:>4}  {match['score']:>7.4f}  {match['file']}")
        else:
            print(f"{'rank':>4}  {'score':>7}  {'pid':>6}  path")
            for match in matches:
                print(f"{match['rank']:>4}  {match['score']:>7.4f}  {match['pid']:>6}  {match['path'] or '(embedded image)'}")
        grid = save_search_grid(matches, query, search_grid_path(args.out, query), gallery_split=gallery)
        print(f"grid: {grid}", flush=True)
        print(f"answered in {answered - query_started:.3f} s ({row}, score = sum of cosines)", file=sys.stderr)
    return 0


def warn_truncated(tokenizer, query: str) -> None:
    """A note on stderr when `query` has more tokens than the text encoder reads (CONTEXT_LENGTH with the
    start and end tokens): the rest is ignored."""
    from trpr.data.tokenizer import CONTEXT_LENGTH

    words = tokenizer(query, add_special_tokens=False)["input_ids"]
    if len(words) > CONTEXT_LENGTH - 2:
        kept = tokenizer.decode(words[: CONTEXT_LENGTH - 2]).split()
        print(f"note: the query is {len(words)} tokens long; the model reads {CONTEXT_LENGTH - 2} (a context of "
              f"{CONTEXT_LENGTH} with start and end), so it was truncated after \"...{' '.join(kept[-4:])}\"",
              file=sys.stderr)


def check_matches_exist(matches: list[dict], folder, args: argparse.Namespace) -> None:
    """Nothing is printed for an image file that no longer exists (the gallery changed after it was
    indexed): EvalInputError naming the file and its rank."""
    for match in matches:
        if match["path"] and not Path(match["path"]).is_file():
            where = f"--gallery {folder}" if folder is not None else f"--dataset {args.dataset}"
            raise EvalInputError(f"{where}: the match at rank {match['rank']}, {match['path']}, no longer exists (the "
                                 "gallery changed while searching); run the search again to index it anew")


def load_folder_gallery(pair, checkpoint, folder: Path, args: argparse.Namespace):
    """The folder's index brought up to date (`update_folder_index`, progress bars), one warning listing
    unreadable files; EvalInputError when the folder holds no readable image."""
    started = time.perf_counter()
    stem = folder_cache_stem(checkpoint, folder, args.cache_dir)
    with unreadable_images_as_input_errors():
        folder_index, update = update_folder_index(pair, folder, stem, batch_size=args.batch_size)
    warn_unreadable(folder_index)
    if not folder_index.files:
        raise EvalInputError(f"--gallery {folder}: no readable image ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                             f"found" + (f"; {len(folder_index.unreadable)} unreadable file(s) listed above"
                                         if folder_index.unreadable else ""))
    args.ann_searcher = lambda _: searcher_for_folder(folder_index, args.index)
    print(f"gallery: {len(folder_index.files)} images in {folder} ({update.describe()}), index at {stem}.json; "
          f"ready in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return folder_index.gallery_index()


def load_benchmark_gallery(checkpoint, args: argparse.Namespace, started: float):
    """(pair, GalleryIndex, gallery split or None) of --dataset/--split: from the cache, else encoded and cached."""
    cache_stem = (args.cache_dir or search_cache_dir()) / search_cache_key(checkpoint, args.dataset, args.root, args.split)
    index = load_gallery_index(cache_stem)
    pair = load_pair(checkpoint).to(search_device(args.device))
    gallery = None
    from_cache = index is not None
    if index is None:
        gallery, _ = load_eval_split(args.dataset, args.root, args.split)
        with unreadable_images_as_input_errors():
            index = build_gallery_index(pair, gallery, batch_size=args.batch_size)
        save_gallery_index(index, cache_stem)
    args.ann_searcher = lambda index: searcher_for(index.image_outputs, cache_stem.with_name(cache_stem.name + ".ann"),
                                                   cache_stem.name, index.pids.numel(), args.index)
    print(f"gallery: {index.pids.numel()} images of {args.dataset} ({args.split}), "
          f"{'from cache' if from_cache else 'encoded and cached'} at {cache_stem}.safetensors; "
          f"ready in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return pair, index, gallery


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `search ...`, `evaluate ...` or (no command named) the evaluation; bad input -> one line on
    stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["evaluate"] + argv
    args = build_parser().parse_args(argv)
    try:
        return search_command(args) if args.command == "search" else evaluate_command(args)
    except EvalInputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C (e.g. ending `search -`): one line, the shell's status for SIGINT
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def cli() -> None:
    """Console entry point (`3rtpr-eval`): progress bars quiet in logs, then `main`."""
    quiet_progress_in_logs()
    sys.exit(main())


if __name__ == "__main__":
    cli()
