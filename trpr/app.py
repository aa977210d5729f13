"""A local web app for free-text search in a folder of photos (Gradio).

    3rtpr-app --checkpoint RUN_DIR --gallery PHOTOS_DIR [--host 127.0.0.1] [--port 7860] [--top 10]
              [--score ROW] [--cache-dir DIR] [--batch-size 64]

The gallery is indexed like `eval_3rtpr.py search --gallery` (the same on-disk index in the cache,
updated when files change; "Rescan folder" picks up changes while the app runs). The server binds
127.0.0.1 unless --host says otherwise: the photos are served to whoever can reach it.
Everything but `build_app` / `main` works without gradio installed (`pip install 3rtpr[app]`).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trpr.evaluation.checkpoints import EvalInputError, load_pair, resolve_checkpoint, unreadable_images_as_input_errors
from trpr.evaluation.folder_gallery import (IMAGE_EXTENSIONS, FolderIndex, check_gallery_folder, folder_cache_stem,
                                            update_folder_index, warn_unreadable)
from trpr.evaluation.ann_index import searcher_for_folder
from trpr.evaluation.search import choose_search_row, search_gallery

PROG = "3rtpr-app"
MAX_TOP = 100
DEFAULT_HOST = "127.0.0.1"
EXIT_BAD_INPUT = 2


@dataclass
class SearchSession:
    """What the app holds between queries: the pair (eval mode), the folder's index, the tokenizer, the
    ranking row, and how the index was last brought up to date."""
    pair: object
    checkpoint: object
    folder: Path
    index: FolderIndex
    tokenizer: object
    row: str
    cache_dir: Path | None = None
    batch_size: int = 64
    status: str = ""

    def refresh(self) -> str:
        """Rescan the folder and update the index (new / changed / removed files); returns the status line."""
        started = time.perf_counter()
        stem = folder_cache_stem(self.checkpoint, self.folder, self.cache_dir)
        with unreadable_images_as_input_errors():
            self.index, update = update_folder_index(self.pair, self.folder, stem, batch_size=self.batch_size)
        warn_unreadable(self.index)
        skipped = f", {len(self.index.unreadable)} unreadable file(s) skipped" if self.index.unreadable else ""
        self.status = (f"{len(self.index.files)} images in {self.folder} ({update.describe()}{skipped}); "
                       f"ranking with {self.row}; ready in {time.perf_counter() - started:.1f} s")
        return self.status


def open_session(checkpoint: str, gallery, *, score: str | None = None, cache_dir=None,
                 batch_size: int = 64) -> SearchSession:
    """Resolve and load the checkpoint, index the gallery folder. EvalInputError (one line) for a bad
    checkpoint, a missing folder or a bad --score; an empty gallery is allowed (the app says so)."""
    from trpr.data.transforms import get_tokenizer

    if batch_size < 1:
        raise EvalInputError(f"--batch-size must be at least 1, got {batch_size}")
    folder = check_gallery_folder(gallery)
    resolved = resolve_checkpoint(checkpoint)
    row, _ = choose_search_row(score, resolved)
    pair = load_pair(resolved).eval()
    session = SearchSession(pair=pair, checkpoint=resolved, folder=folder, index=None, tokenizer=get_tokenizer(),
                            row=row, cache_dir=None if cache_dir is None else Path(cache_dir), batch_size=batch_size)
    session.refresh()
    return session


def answer(session: SearchSession, query: str, top) -> tuple[list, list, str]:
    """One query -> (gallery items [(image path, "#rank · score · file")], table rows [[rank, score, file]],
    a Markdown message). An empty query or gallery gives a message and no results, never an exception."""
    query = (query or "").strip()
    if not query:
        return [], [], "Type a description of the person, e.g. *a man in a blue jacket with a black backpack*."
    if not session.index.files:
        kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        extra = f" ({len(session.index.unreadable)} file(s) could not be read)" if session.index.unreadable else ""
        return [], [], (f"The gallery `{session.folder}` holds no readable image ({kinds}){extra}. Add photos, "
                        "then press *Rescan folder*.")
    try:
        top = int(top)
    except (TypeError, ValueError):
        return [], [], f"Top-k must be a whole number between 1 and {MAX_TOP}, got {top!r}."
    top = max(1, min(MAX_TOP, top))
    started = time.perf_counter()
    matches = search_gallery(session.pair, session.index.gallery_index(), query, tokenizer=session.tokenizer,
                             row=session.row, top=top, ann=searcher_for_folder(session.index, "auto"))
    seconds = time.perf_counter() - started
    items = [(match["path"], f"#{match['rank']} · {match['score']:.3f} · {match['file']}") for match in matches]
    rows = [[match["rank"], round(match["score"], 4), match["file"]] for match in matches]
    message = (f"{len(matches)} of {len(session.index.files)} images for *{query}* in {seconds:.3f} s "
               f"({session.row}: score = sum of cosines).")
    return items, rows, message


def build_app(session: SearchSession, default_top: int = 10):
    """The Gradio Blocks UI: query box, top-k slider, Search / Rescan buttons, result gallery, ranked table."""
    import gradio as gr

    def on_search(query, top):
        items, rows, message = answer(session, query, top)
        return items, rows, message

    def on_rescan():
        try:
            return session.refresh()
        except EvalInputError as error:
            return f"Rescan failed: {error}"

    with gr.Blocks(title="3RTPR photo search") as app:
        gr.Markdown(f"## 3RTPR photo search\nSearching `{session.folder}` with `{session.checkpoint.name}`.")
        with gr.Row():
            query = gr.Textbox(label="Description", placeholder="a woman in a red coat with a black handbag", scale=4)
            top = gr.Slider(1, MAX_TOP, value=max(1, min(MAX_TOP, default_top)), step=1, label="Top-k", scale=1)
        with gr.Row():
            search = gr.Button("Search", variant="primary")
            rescan = gr.Button("Rescan folder")
        message = gr.Markdown()
        gallery = gr.Gallery(label="Matches (rank · score · file)", columns=5, object_fit="contain", height="auto")
        table = gr.Dataframe(headers=["rank", "score", "file"], label="Ranked list", interactive=False)
        status = gr.Markdown(session.status)
        search.click(on_search, [query, top], [gallery, table, message])
        query.submit(on_search, [query, top], [gallery, table, message])
        rescan.click(on_rescan, [], [status])
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run folder, ReciprocalPair folder or Hub repo id")
    parser.add_argument("--gallery", required=True, type=Path, metavar="DIR",
                        help=f"folder of images, searched recursively ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--top", type=int, default=10, help=f"initial top-k, 1..{MAX_TOP} (default 10)")
    parser.add_argument("--score", default=None, help="ranking row (default: the run's eval.select_row, else A+B/GE+FS)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: $TRPR_CACHE/search-features)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size while indexing (default 64)")
    return parser


def main(argv: list[str] | None = None, launch: bool = True) -> int:
    """Parse, open the session (index the gallery), build the UI and serve it; bad input -> one line on
    stderr and exit status 2. launch=False returns after building the UI (for tests)."""
    args = build_parser().parse_args(argv)
    try:
        if not 1 <= args.top <= MAX_TOP:
            raise EvalInputError(f"--top must be between 1 and {MAX_TOP}, got {args.top}")
        session = open_session(args.checkpoint, args.gallery, score=args.score, cache_dir=args.cache_dir,
                               batch_size=args.batch_size)
    except EvalInputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(session.status, file=sys.stderr)
    try:
        app = build_app(session, args.top)
    except ImportError:
        print(f"{PROG}: error: the web app needs gradio: pip install '3rtpr[app]' (or pip install gradio)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if launch:
        app.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(session.folder)])
    return 0


def cli() -> None:
    """Console entry point `3rtpr-app`."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
