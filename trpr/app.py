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
    # a custom dataset folder (annotations.csv / .jsonl): relative image path -> pid, and caption -> pids;
    # a query that is one of its captions gets each hit marked as a true or false match
    identities: dict | None = None
    caption_pids: dict | None = None
    last: tuple = ("", [])  # (query, matches) of the last answer: what "explain" refers to

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
    from trpr.data.tokenizer import get_tokenizer

    if batch_size < 1:
        raise EvalInputError(f"--batch-size must be at least 1, got {batch_size}")
    folder = check_gallery_folder(gallery)
    resolved = resolve_checkpoint(checkpoint)
    row, _ = choose_search_row(score, resolved)
    pair = load_pair(resolved).eval()
    session = SearchSession(pair=pair, checkpoint=resolved, folder=folder, index=None, tokenizer=get_tokenizer(),
                            row=row, cache_dir=None if cache_dir is None else Path(cache_dir), batch_size=batch_size)
    session.identities, session.caption_pids = read_identities(folder)
    session.refresh()
    return session


def read_identities(folder: Path) -> tuple[dict | None, dict | None]:
    """({relative image path: pid}, {normalised caption: {pids}}) when `folder` is a custom dataset (it holds
    annotations.csv or annotations.jsonl, trpr/data/README.md), else (None, None). Rows the dataset's
    review would reject (no pid, bad path) are left out here rather than stopping the app."""
    from trpr.data.folder_dataset import ANNOTATION_NAMES, _normalise_image, _parse_pid, read_rows

    path = next((folder / name for name in ANNOTATION_NAMES if (folder / name).is_file()), None)
    if path is None:
        return None, None
    try:
        rows, _ = read_rows(path)
    except (OSError, ValueError) as error:
        print(f"{PROG}: warning: {path}: identities not read ({error})", file=sys.stderr)
        return None, None
    identities, captions = {}, {}
    for _, row in rows:
        pid, _problem = _parse_pid(row.get("pid"))
        image, _problem = _normalise_image(row.get("image"))
        if pid is None or not image:
            continue
        identities[image] = pid
        caption = normalise_caption(row.get("caption"))
        if caption:
            captions.setdefault(caption, set()).add(pid)
    return identities, captions


def normalise_caption(text) -> str:
    """Lower case, single spaces, no trailing full stop: how a typed query is matched to a known caption."""
    return " ".join(str(text or "").lower().split()).rstrip(".").strip()


def match_marks(session: SearchSession, query: str, matches: list[dict]) -> list[str] | None:
    """Per match "true match" / "false match" when the query is one of the custom dataset's captions (its
    identity is then known), else None."""
    if not session.identities or not session.caption_pids:
        return None
    pids = session.caption_pids.get(normalise_caption(query))
    if not pids:
        return None
    return ["true match" if session.identities.get(m["file"]) in pids else "false match" for m in matches]


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
    session.last = (query, matches)
    marks = match_marks(session, query, matches) or [""] * len(matches)
    symbols = {"true match": " · ✓", "false match": " · ✗", "": ""}
    items = [(match["path"], f"#{match['rank']} · {match['score']:.3f} · {match['file']}{symbols[mark]}")
             for match, mark in zip(matches, marks)]
    rows = [[match["rank"], round(match["score"], 4), match["file"], mark] for match, mark in zip(matches, marks)]
    message = (f"{len(matches)} of {len(session.index.files)} images for *{query}* in {seconds:.3f} s "
               f"({session.row}: score = sum of cosines).")
    if any(marks):
        message += f" {marks.count('true match')} of {len(marks)} are the described person (✓)."
    return items, rows, message


def explain(session: SearchSession, position: int, *, scale: int = 6) -> dict:
    """Why result `position` (0-based) of the last answer matched: the image patches its fused head pooled,
    drawn over the picture (as the model saw it, `scale`× enlarged), and the query tokens the text fused
    head pooled. The model is A for rows on A or A+B, B for rows on B. Returns {"image" (PIL), "patches"
    (grid positions, most attended first), "words" [(token, "selected" | None)], "selected_positions"
    (token positions), "model", "text" (a Markdown summary)}; {"text": reason} when there is nothing to
    explain (no search yet, no fused head)."""
    import torch
    from PIL import Image, ImageDraw

    from trpr.data.images import open_image
    from trpr.data.tokenizer import tokenize
    from trpr.evaluation.folder_gallery import FolderImages

    query, matches = session.last
    if not matches or not 0 <= position < len(matches):
        return {"text": "Search first, then select a result to see why it matched."}
    match = matches[position]
    model_name = "B" if session.row.startswith("B/") else "A"
    model = session.pair.b if model_name == "B" else session.pair.a
    if model.image_head is None:
        return {"text": "This checkpoint has no fused heads (select_ratio 0): nothing was selected to show."}
    images = FolderImages([match["path"]], tuple(model.image_size))
    resized = images.transform.resize(open_image(match["path"]))  # what FolderImages feeds the model
    pixels = images[0]["pixel_values"][None]
    device = next(model.parameters()).device
    with torch.no_grad():
        patch_index = model.explain_image(pixels.to(device))
        input_ids, attention_mask = tokenize(session.tokenizer, [query])
        text_index, valid = model.explain_text(input_ids.to(device), attention_mask.to(device))
    picture = Image.fromarray(resized).resize((resized.shape[1] * scale, resized.shape[0] * scale), Image.NEAREST)
    rows, columns, patch = model.patch_grid()
    patches = [] if patch_index is None else [int(i) for i in patch_index[0].tolist()]
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i in patches:
        top, left = (i // columns) * patch * scale, (i % columns) * patch * scale
        draw.rectangle([left, top, left + patch * scale - 1, top + patch * scale - 1], fill=(255, 200, 0, 70),
                       outline=(255, 140, 0, 255), width=2)
    picture = Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
    selected = sorted(int(i) for i, ok in zip(text_index[0].tolist(), valid[0].tolist()) if ok)
    length = int(attention_mask[0].sum())
    tokens = session.tokenizer.convert_ids_to_tokens(input_ids[0, 1:length - 1].tolist())
    words = [(token.replace("</w>", " "), "selected" if position + 1 in selected else None)
             for position, token in enumerate(tokens)]
    mark = (match_marks(session, query, [match]) or [""])[0]
    verdict = {"true match": " It is the described person (✓ true match).",
               "false match": " It is not the described person (✗ false match)."}.get(mark, "")
    pooled_image = (f"the {len(patches)} highlighted patches of the {rows}×{columns} grid" if patch_index is not None
                    else f"every patch of the {rows}×{columns} grid (image_tokens {model.image_head.image_tokens}: "
                         "no patch selection)")
    text = (f"**#{match['rank']} {match['file']}** (score {match['score']:.3f}).{verdict} Model {model_name}'s fused "
            f"heads pooled {pooled_image} and the words "
            f"{', '.join(repr(words[p - 1][0].strip()) for p in selected)} of the query.")
    return {"image": picture, "patches": patches, "words": words, "selected_positions": selected,
            "model": model_name, "text": text}


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (shorter, and no home folder in
    screenshots), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_app(session: SearchSession, default_top: int = 10):
    """The Gradio Blocks UI: query box, top-k slider, Search / Rescan buttons, result gallery, the selected
    result's explanation (patches over the picture, highlighted query words, true/false match), ranked table."""
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
        gr.Markdown(f"## 3RTPR photo search\nSearching `{shown_path(session.folder)}` with `{session.checkpoint.name}`.")
        with gr.Row():
            query = gr.Textbox(label="Description", placeholder="a woman in a red coat with a black handbag", scale=4,
                               elem_id="query")
            top = gr.Slider(1, MAX_TOP, value=max(1, min(MAX_TOP, default_top)), step=1, label="Top-k", scale=1,
                            elem_id="top")
        with gr.Row():
            search = gr.Button("Search", variant="primary", elem_id="search")
            rescan = gr.Button("Rescan folder", elem_id="rescan")
        message = gr.Markdown(elem_id="message")
        gallery = gr.Gallery(label="Matches (rank · score · file)", columns=5, object_fit="contain", height="auto",
                             elem_id="results")
        with gr.Row():
            explain_image = gr.Image(label="Why: patches the image head pooled", type="pil", height=420,
                                     elem_id="explain-image", scale=1)
            with gr.Column(scale=3):
                explain_words = gr.HighlightedText(label="Words of the query the text head selected",
                                                   color_map={"selected": "orange"}, show_inline_category=False,
                                                   elem_id="explain-words")
                explain_text = gr.Markdown("Select a result to see why it matched.", elem_id="explain-text")
        table = gr.Dataframe(headers=["rank", "score", "file", "match"], label="Ranked list", interactive=False,
                             elem_id="table")
        status = gr.Markdown(session.status, elem_id="status")
        search.click(on_search, [query, top], [gallery, table, message], api_name="search")
        query.submit(on_search, [query, top], [gallery, table, message], api_name=False)
        rescan.click(on_rescan, [], [status], api_name="rescan")

        def on_select(event):
            shown = explain(session, event.index)
            return shown.get("image"), shown.get("words"), shown["text"]

        # a real class, not the string `from __future__ import annotations` makes: gradio injects SelectData by it
        on_select.__annotations__ = {"event": gr.SelectData}

        gallery.select(on_select, [], [explain_image, explain_words, explain_text], api_name=False)

        def explain_result(position: int) -> str:
            """The explanation (Markdown) of result `position` (0-based) of the last search."""
            return explain(session, int(position))["text"]

        gr.api(explain_result, api_name="explain")
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
