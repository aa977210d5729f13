"""Search at 10^4, 10^5 and 10^6 gallery items: the approximate index (FAISS IVF candidates + exact
re-scoring, trpr.evaluation.ann_index) side by side with exact search over the same shards, same run.

    nice -n 10 python -m trpr.benchmarks.million_gallery                       # 10^4, 10^5, 10^6 (demo dims)
    python -m trpr.benchmarks.million_gallery --sizes 10000 --queries 50      # quick look

Gallery rows (fp16 shards, gallery_shards) come from real encodings: `--images` synth-pedes gallery images,
each rendered `--renders` times through the training augmentation (flip, pad-and-crop, erase; seeded),
encoded by the demo architecture (trpr/configs/synth-pedes.yaml: width 64, 2 layers, joint space 64,
fused 128 -> A+B/GE+FS = 384 floats per image; random init, or --checkpoint). Row i < B (B = images x
renders) is encoding i itself; every further row is a perturbation of a real one:
b_j + lam (b_k - b_j) + 0.25 sigma * z with j, k random encodings, lam ~ U(0, 0.25), sigma the per-column
std of the encodings and z ~ N(0, 1), per piece, so the gallery keeps the encodings' cluster structure.
Queries: `--queries` synth-pedes captions encoded by the same models.

Per size and mode a fresh search process (subprocess) opens the shards (+ the FAISS index), answers every
query one by one and reports p50 / p99 latency (after one warm-up query) and its peak resident memory
(ru_maxrss). Recall@1 / @10 are of the exact ranking (the exact process's top 10) on the same row.
Prints a Markdown table and a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trpr.evaluation import ann_index, gallery_shards
from trpr.runtime.atomic import atomic_write_json

ROW = "A+B/GE+FS"


def demo_pair(checkpoint: str | None, model: str = "demo"):
    """The checkpoint's pair, else the demo architecture at 64 x 32 px (model "demo") or ViT-B/16 with
    fused 2048 at 384 x 128 px ("vit-b16"), random init (seed 0)."""
    from trpr import modeling

    if checkpoint:
        from trpr.evaluation.checkpoints import load_pair, resolve_checkpoint

        return load_pair(resolve_checkpoint(checkpoint)).eval()
    torch.manual_seed(0)
    if model == "vit-b16":
        return modeling.ReciprocalPair.from_clip(modeling.vit_b16_config(), select_ratio=0.2, fused_dim=2048,
                                                 image_size=(384, 128)).eval()
    config = modeling.small_clip_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, projection_dim=64, vision_patch_size=8)
    return modeling.ReciprocalPair.from_clip(config, select_ratio=0.2, fused_dim=128, image_size=(64, 32)).eval()


class Renders(torch.utils.data.Dataset):
    """item k -> {"pixel_values"}: image k % n through the training augmentation, seeded by k."""

    def __init__(self, paths, image_size, renders: int):
        from trpr.data.transforms import build_image_transform

        self.paths, self.renders = list(paths), renders
        self.transform = build_image_transform(train=True, image_size=image_size)

    def __len__(self):
        return len(self.paths) * self.renders

    def __getitem__(self, k):
        from trpr.data.images import open_image

        image = self.transform.resize(open_image(self.paths[k % len(self.paths)]))
        uint8, box = self.transform.augment(image, torch.Generator().manual_seed(k))
        return {"pixel_values": self.transform.to_float(uint8, box)}


def real_encodings(pair, images: int, renders: int, queries: int, batch_size: int = 128,
                   dataset: str = "synth-pedes"):
    """(gallery raw rows float32 [images x renders, dim], columns, query raw rows float32 [Q, dim], image paths)."""
    from trpr import data
    from trpr.data.torch_datasets import image_sources
    from trpr.data.tokenizer import get_tokenizer, tokenize
    from trpr.runtime.encoding import encode, eval_mode

    splits = data.load_benchmark(dataset)
    sources = []
    for name in ("test_gallery", "val_gallery", "train"):  # every split with images, test first
        if name in splits and "image" in splits[name].column_names:
            sources += [s for s in image_sources(splits[name]) if isinstance(s, str) and s not in sources]
    sources = sorted(set(sources), key=sources.index)[:images]
    dataset = Renders(sources, tuple(pair.a.image_size), renders)
    with eval_mode(pair), torch.no_grad():
        outputs = encode([pair.a, pair.b], dataset, "image", batch_size=batch_size, desc="real encodings")
        captions = list(splits["test_queries"]["caption"])[:queries]
        ids, mask = tokenize(get_tokenizer(), captions)
        text = [m.encode_text(ids, mask) for m in (pair.a, pair.b)]
    columns = gallery_shards.piece_columns([(m.embed_dim, m.output_dim) for m in (pair.a, pair.b)])
    rows = torch.cat([p.float() for out in outputs for p in out], dim=1).numpy()
    query_rows = torch.cat([p.float() for out in text for p in out], dim=1).numpy()
    return rows, columns, query_rows, sources


def project_dims(base: np.ndarray, queries: np.ndarray, columns: dict, global_dim: int, fused_dim: int,
                 seed: int = 0) -> tuple:
    """(gallery rows, query rows, columns) with every piece mapped to `global_dim` (a.global, b.global) or
    `fused_dim` (a.fused, b.fused) floats by a fixed random Gaussian matrix (seeded; entries N(0, 1/width)),
    the same matrix for gallery and queries. A random linear map to at least as many dims is injective and
    nearly preserves inner products and norms (Johnson-Lindenstrauss), so each query's exact cosine
    ranking of the real encodings is kept, while the row has the target width (the perturbations of
    `write_gallery` are then drawn in that width, full rank)."""
    rng = np.random.default_rng(seed)
    widths = {"a.global": global_dim, "a.fused": fused_dim, "b.global": global_dim, "b.fused": fused_dim}
    out_base, out_queries, out_columns, start = [], [], {}, 0
    for name in gallery_shards.PIECES:
        lo, hi = columns[name]
        matrix = rng.standard_normal((hi - lo, widths[name]), dtype=np.float32) / np.sqrt(hi - lo, dtype=np.float32)
        out_base.append(base[:, lo:hi] @ matrix)
        out_queries.append(queries[:, lo:hi] @ matrix)
        out_columns[name] = [start, start + widths[name]]
        start += widths[name]
    return np.concatenate(out_base, axis=1), np.concatenate(out_queries, axis=1), out_columns


def derived_rows(base: np.ndarray, seed: int = 0):
    """rows(start, stop) -> float32 [stop - start, dim], to be called on consecutive ranges from 0: row i <
    len(base) is base[i], every later one a perturbation of real rows (module docstring)."""
    rng = np.random.default_rng(seed)
    sigma = base.std(axis=0, keepdims=True)

    def rows(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, base.shape[1]), dtype=np.float32)
        real = np.arange(start, stop) < len(base)
        out[real] = base[np.arange(start, stop)[real]]
        fake = int((~real).sum())
        if fake:
            j, k = rng.integers(0, len(base), fake), rng.integers(0, len(base), fake)
            lam = rng.uniform(0, 0.25, (fake, 1)).astype(np.float32)
            noise = rng.standard_normal((fake, base.shape[1]), dtype=np.float32)
            out[~real] = base[j] + lam * (base[k] - base[j]) + 0.25 * sigma * noise
        return out

    return rows


def write_gallery(base: np.ndarray, columns: dict, count: int, shard_dir: Path, *, seed: int = 0,
                  shard_size: int = 65536) -> gallery_shards.ShardStore:
    """`count` rows as fp16 shards: the real encodings first, then perturbations of them (module docstring)."""
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    return gallery_shards.write_rows_to_shards(shard_dir, count, columns, derived_rows(base, seed),
                                               job=f"bench-{count}-{seed}", shard_size=shard_size)


def serve(shard_dir: Path, mode: str, queries_path: Path, top: int, latency_queries: int) -> dict:
    """One search process: open, answer queries one by one, report latencies, peak RSS and the rankings."""
    started = time.perf_counter()
    store = gallery_shards.ShardStore(shard_dir)
    searcher = ann_index.AnnSearcher.open(store, shard_dir, progress=False) if mode == "ann" else None
    if searcher is not None:
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time: no OpenMP team to wake on a busy 2-core machine
    opened = time.perf_counter() - started
    queries = np.load(queries_path, allow_pickle=False)
    latencies, rankings = [], []
    for number, query in enumerate(queries[:latency_queries + 1]):
        begin = time.perf_counter()
        rows, _ = searcher.search(query, ROW, top) if searcher else ann_index.exact_search(store, query, ROW, top)
        if number:  # the first query warms up
            latencies.append(time.perf_counter() - begin)
        rankings.append(rows.tolist())
    return {"open_s": opened, "latency_ms": [1000 * x for x in latencies], "rankings": rankings,
            "max_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_rankings(store, queries: np.ndarray, top: int) -> np.ndarray:
    """int64 [Q, top]: the exact ranking of every query, all queries per chunk (ties: gallery order)."""
    pieces = ann_index.row_pieces(ROW)
    q = ann_index.row_matrix(queries, store.columns, pieces)
    best_rows = np.zeros((len(q), 0), dtype=np.int64)
    best_scores = np.zeros((len(q), 0), dtype=np.float32)
    for first, chunk in store.chunks():
        scores = q @ ann_index.row_matrix(chunk, store.columns, pieces).T
        keep = np.argpartition(-scores, top, axis=1)[:, :top] if scores.shape[1] > top else \
            np.tile(np.arange(scores.shape[1]), (len(q), 1))
        best_rows = np.concatenate([best_rows, first + keep], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, keep, 1)], axis=1)
        order = np.stack([np.lexsort((r, -s)) for r, s in zip(best_rows, best_scores)])[:, :top]
        best_rows, best_scores = np.take_along_axis(best_rows, order, 1), np.take_along_axis(best_scores, order, 1)
    return best_rows


def _child(shard_dir, mode, queries_path, top, latency_queries) -> dict:
    out = shard_dir / f"serve-{mode}.json"
    subprocess.run([sys.executable, "-m", "trpr.benchmarks.million_gallery", "--serve", str(shard_dir), "--mode", mode,
                    "--queries-file", str(queries_path), "--top", str(top), "--latency-queries", str(latency_queries),
                    "--serve-out", str(out)], check=True)
    return json.loads(out.read_text())


def _time_v(command: list, stdin: str, env: dict) -> dict:
    """Run `command` under /usr/bin/time -v with `stdin`; its peak RSS (MB), wall time and stderr lines."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], input=stdin, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = {}
    for line in done.stderr.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size (kbytes):"):
            report["max_rss_mb"] = int(line.rsplit(":", 1)[1]) / 1024
        elif line.startswith("Elapsed (wall clock) time"):
            clock = line.rsplit(" ", 1)[1].split(":")
            report["wall_s"] = sum(float(x) * 60 ** i for i, x in enumerate(reversed(clock)))
    report["answered_ms"] = [1000 * float(line.split()[2]) for line in done.stderr.splitlines()
                             if line.startswith("answered in ")]
    report["ready"] = [line for line in done.stderr.splitlines() if line.startswith(("gallery:", "approximate index:"))]
    report["first_result"] = next((line for line in done.stdout.splitlines() if line.strip().startswith("1 ")), "")
    return report


def folder_gallery_search(pair, base: np.ndarray, columns: dict, sources: list, captions: list, count: int,
                          work: Path, exact_queries: int = 3) -> dict:
    """A folder-gallery index of `count` items and real `eval_3rtpr.py search --gallery` processes over it.

    The folder holds `count` image files: hard links (no data copied) to the synth-pedes images in
    `sources`, `<work>/photos/dNNNN/NNNNNNN.png`, 1,000 per sub-folder. The index is written in the folder
    gallery's own format with its own functions (scan_gallery for the file keys, write_rows_to_shards into
    the generation folder, commit_generation for the .json), under the key `search --gallery` computes for
    this checkpoint and folder, so the search process finds it up to date and encodes nothing; its rows are
    the derived gallery (`derived_rows`: real encodings first, then perturbations), not encodings of the
    linked files, which only the result grids read. Then three search processes read `captions` from
    stdin (`search -`), each under /usr/bin/time -v: --index auto (the first builds the FAISS index),
    auto again (reads it), and --index exact on `exact_queries` captions (streamed from the shards).
    """
    from trpr.evaluation import folder_gallery as fg
    from trpr.evaluation.checkpoints import resolve_checkpoint

    root = Path(__file__).resolve().parents[2]
    if work.exists():
        shutil.rmtree(work)
    pair_dir, photos, cache = work / "pair", work / "photos", work / "cache"
    pair.save_pretrained(pair_dir)
    started = time.perf_counter()
    for number in range(count):
        folder = photos / f"d{number // 1000:04d}"
        if number % 1000 == 0:
            folder.mkdir(parents=True)
        os.link(sources[number % len(sources)], folder / f"{number:07d}.png")
    link_s = time.perf_counter() - started
    checkpoint = resolve_checkpoint(str(pair_dir))
    stem = fg.folder_cache_stem(checkpoint, photos, cache)
    started = time.perf_counter()
    files = fg.scan_gallery(photos)
    scan_s = time.perf_counter() - started
    started = time.perf_counter()
    index_id = fg.new_index_id()
    store = gallery_shards.write_rows_to_shards(fg.generation_dir(stem, index_id), len(files), columns,
                                                derived_rows(base), job=index_id)
    fg.commit_generation(stem, fg.FolderIndex(folder=photos, files=files, store=store, index_id=index_id))
    write_s = time.perf_counter() - started
    print(f"folder gallery: {count} links in {link_s:.0f} s, scan {scan_s:.1f} s, index written in {write_s:.0f} s",
          file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1"}
    command = [sys.executable, str(root / "eval_3rtpr.py"), "search", "-", "--checkpoint", str(pair_dir), "--gallery",
               str(photos), "--cache-dir", str(cache), "--out", str(work / "out"), "--top", "10"]
    stdin = "\n".join(captions) + "\n"
    runs = {"auto, builds the ANN index": _time_v(command, stdin, env),
            "auto, reads the ANN index": _time_v(command, stdin, env),
            "exact (streamed)": _time_v(command + ["--index", "exact"], "\n".join(captions[:exact_queries]) + "\n", env)}
    for report in runs.values():
        lat = report.pop("answered_ms")[1:]  # the first query warms up
        report.update(p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)), timed=len(lat))
    disk = {"json_mb": stem.with_suffix(".json").stat().st_size / 2**20, "shards_mb": store.nbytes() / 2**20,
            "faiss_mb": _du([stem.with_name(stem.name + ".ann") / "ann.faiss"]) / 2**20}
    return {"count": count, "dim": store.dim, "link_s": link_s, "scan_s": scan_s, "write_index_s": write_s,
            "disk": disk, "runs": runs}


def _du(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--images", type=int, default=1000, help="synth-pedes gallery images encoded")
    parser.add_argument("--renders", type=int, default=4, help="augmented renders per image")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-latency-queries", type=int, default=20, help="exact queries timed one by one")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--model", choices=("demo", "vit-b16"), default="demo",
                        help="random-init architecture when no --checkpoint (vit-b16: 5,120 floats per A+B/GE+FS row)")
    parser.add_argument("--checkpoint", default=None, help="a run / pair folder (default: demo architecture, random init)")
    parser.add_argument("--dims", default=None, metavar="GLOBAL,FUSED",
                        help="map each encoding piece to these widths (e.g. 512,2048: ViT-B/16's 5,120 floats per "
                             "A+B/GE+FS row) by a fixed random projection (project_dims)")
    parser.add_argument("--dataset", default="synth-pedes", help="synth-pedes preset the images and captions come from")
    parser.add_argument("--folder-gallery", type=int, default=0, metavar="N",
                        help="instead: a folder-gallery index of N items and real `eval_3rtpr.py search --gallery` "
                             "processes over it (folder_gallery_search)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/3rtpr-million"))
    parser.add_argument("--keep", action="store_true", help="keep the galleries under --work")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("exact", "ann"), help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--latency-queries", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        result = serve(args.serve, args.mode, args.queries_file, args.top, args.latency_queries)
        args.serve_out.write_text(json.dumps(result))
        return result

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pair = demo_pair(args.checkpoint, args.model)
    base, columns, queries, sources = real_encodings(pair, args.images, args.renders, args.queries,
                                                     dataset=args.dataset)
    encode_s = time.perf_counter() - started
    if args.folder_gallery:
        from trpr import data

        captions = list(data.load_benchmark(args.dataset)["test_queries"]["caption"])[:args.queries]
        result = folder_gallery_search(pair, base, columns, sources, captions, args.folder_gallery,
                                       args.work / "folder", args.exact_latency_queries + 1)
        result.update(model=args.checkpoint or args.model, date=time.strftime("%Y-%m-%d"), real_encodings=len(base),
                      machine=f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                      load_average=os.getloadavg())
        print(json.dumps(result))
        if not args.keep:
            shutil.rmtree(args.work / "folder")
        return result
    if args.dims:
        global_dim, fused_dim = (int(x) for x in args.dims.split(","))
        base, queries, columns = project_dims(base, queries, columns, global_dim, fused_dim)
    queries_path = args.work / "queries.npy"
    np.save(queries_path, queries, allow_pickle=False)
    print(f"{len(base)} real encodings ({args.images} images x {args.renders} renders) and {len(queries)} queries "
          f"in {encode_s:.0f} s; {base.shape[1]} floats per row", file=sys.stderr)
    results = []
    for size in args.sizes:
        shard_dir = args.work / f"gallery-{size}"
        begin = time.perf_counter()
        store = write_gallery(base, columns, size, shard_dir)
        write_s = time.perf_counter() - begin
        begin = time.perf_counter()
        searcher = ann_index.AnnSearcher.open(store, shard_dir)
        ann_build_s = time.perf_counter() - begin
        truth = exact_rankings(store, queries, args.top)
        exact = _child(shard_dir, "exact", queries_path, args.top, min(args.exact_latency_queries, len(queries) - 1))
        ann = _child(shard_dir, "ann", queries_path, args.top, len(queries) - 1)
        ann_rank = np.array(ann["rankings"])
        n = len(exact["rankings"])  # the exact process's own top 10 vs the batched one (float rounding only)
        agreement = float(np.mean([a == t for a, t in zip(exact["rankings"], truth[:n].tolist())]))
        recall1 = float(np.mean(ann_rank[:, 0] == truth[: len(ann_rank), 0]))
        recall10 = float(np.mean([len(set(a) & set(t)) / args.top for a, t in zip(ann_rank, truth)]))
        shard_bytes = store.nbytes()
        row = {"size": size, "dim": store.dim, "write_shards_s": write_s, "ann_build_s": ann_build_s,
               "params": vars(searcher.params), "shards_mb": shard_bytes / 2**20,
               "faiss_mb": (shard_dir / "ann.faiss").stat().st_size / 2**20,
               "exact": {k: v for k, v in exact.items() if k != "rankings"},
               "ann": {k: v for k, v in ann.items() if k != "rankings"}, "recall@1": recall1, "recall@10": recall10, "exact_process_agrees": agreement}
        for mode in ("exact", "ann"):
            lat = row[mode].pop("latency_ms")
            row[mode].update(p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)), timed=len(lat))
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(shard_dir)
    header = ("| gallery | mode | build | memory (peak RSS) | disk | p50 query | p99 query | recall@1 | recall@10 |\n"
              "|---:|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in results:
        lines.append(f"| {r['size']:,} | exact (streamed from shards) | shards {r['write_shards_s']:.1f} s | "
                     f"{r['exact']['max_rss_mb']:.0f} MB | {r['shards_mb']:.0f} MB | {r['exact']['p50_ms']:.1f} ms | "
                     f"{r['exact']['p99_ms']:.1f} ms ({r['exact']['timed']} q) | 1 | 1 |")
        p = r["params"]
        lines.append(f"| {r['size']:,} | ann (IVF nlist {p['nlist']}, nprobe {p['nprobe']}, {p['candidates']} re-scored) | "
                     f"+ index {r['ann_build_s']:.1f} s | {r['ann']['max_rss_mb']:.0f} MB | + {r['faiss_mb']:.0f} MB | "
                     f"{r['ann']['p50_ms']:.2f} ms | {r['ann']['p99_ms']:.2f} ms ({r['ann']['timed']} q) | "
                     f"{r['recall@1']:.3f} | {r['recall@10']:.3f} |")
    table = "\n".join(lines)
    summary = {"model": args.checkpoint or args.model, "dims": args.dims, "load_average": os.getloadavg(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d"), "row": ROW, "real_encodings": len(base), "queries": len(queries),
               "results": results}
    print(table)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
