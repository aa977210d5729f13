"""The CLIP tokenizer and the token layout of a caption (docs/design.md, "Tokens").

The CLIP BPE tokenizer (ids equal to `openai/clip-vit-base-patch16`'s), built offline from the bundled
`trpr/data/assets/clip_bpe_simple_vocab_16e6.txt.gz` when no local tokenizer folder is given; the derived
vocabulary files are cached in `runtime.cache.tokenizer_cache_dir()` ($TRPR_CACHE/clip_bpe).
Rows are `SOT w1 .. wn EOT` followed by pad id 0 (attention_mask 0); EOT is always the last real token.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from trpr.runtime.atomic import atomic_path
from trpr.runtime.cache import tokenizer_cache_dir

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 49405  # the last BPE merge's slot; see docs/decisions.md
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

BPE_ASSET = Path(__file__).resolve().parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
NUM_BPE_MERGES = 49152 - 256 - 2  # 48894, as in OpenAI CLIP's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def derive_clip_vocab_files(out_dir: Union[str, Path], bpe_path: Union[str, Path] = BPE_ASSET) -> Path:
    """Write `vocab.json` and `merges.txt` derived from CLIP's BPE merge list, as OpenAI CLIP does:
    the 256 byte-unicode characters, the same with '</w>', the first 48894 merges joined, then
    <|startoftext|> (49406) and <|endoftext|> (49407). Written atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        damaged = vocab_files_problem(out_dir)
        if damaged is None:
            return out_dir
        import sys

        print(f"warning: {damaged}; rebuilding it from {bpe_path.name if isinstance(bpe_path, Path) else bpe_path}",
              file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_BPE_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: derived {len(vocab_list)} vocabulary entries, expected {VOCAB_SIZE}")
    vocab = {token: idx for idx, token in enumerate(vocab_list)}
    with atomic_path(merges_path) as merges_tmp, atomic_path(vocab_path) as vocab_tmp:  # vocab.json first
        vocab_tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return out_dir


def vocab_files_problem(folder: Path) -> Optional[str]:
    """What is wrong with the derived `vocab.json` / `merges.txt` in `folder` ("FILE: reason", naming the
    file), or None when both are complete (a JSON object of VOCAB_SIZE ids 0..VOCAB_SIZE-1; the version line
    and NUM_BPE_MERGES merges)."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{vocab_path}: damaged tokenizer cache ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if not isinstance(vocab, dict) or len(vocab) != VOCAB_SIZE or sorted(vocab.values()) != list(range(VOCAB_SIZE)):
        return f"{vocab_path}: damaged tokenizer cache (not the {VOCAB_SIZE} CLIP vocabulary ids)"
    try:
        lines = merges_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, ValueError) as error:
        return f"{merges_path}: damaged tokenizer cache ({type(error).__name__})"
    if not lines[0].startswith("#version") or len(lines) != NUM_BPE_MERGES + 1 or \
            any(len(line.split(" ")) != 2 for line in lines[1:]):
        return f"{merges_path}: damaged tokenizer cache (not the {NUM_BPE_MERGES} CLIP merges)"
    return None


@lru_cache(maxsize=8)
def get_tokenizer(name_or_path: Optional[str] = None):
    """The CLIP tokenizer (HF `CLIPTokenizerFast`).

    name_or_path: a local folder holding tokenizer files -> loaded from it; a hub name (e.g.
    `openai/clip-vit-base-patch16`) -> loaded from the hub/cache when reachable; None, or a hub name
    that cannot be loaded offline -> built from the bundled CLIP BPE vocabulary (same ids)."""
    from transformers import CLIPTokenizerFast

    if name_or_path is not None:
        path = Path(name_or_path)
        if path.is_dir():
            return CLIPTokenizerFast.from_pretrained(str(path))
        if path.exists():
            raise ValueError(f"tokenizer path {path} is a file; pass the folder holding the tokenizer files")
        try:
            return CLIPTokenizerFast.from_pretrained(str(name_or_path))
        except (OSError, ValueError):
            pass  # offline or unknown: the bundled vocabulary gives the same ids for CLIP checkpoints
    try:
        vocab_dir = derive_clip_vocab_files(tokenizer_cache_dir())
    except OSError:  # read-only home / cache: derive into a private temporary folder instead
        import tempfile

        vocab_dir = derive_clip_vocab_files(Path(tempfile.mkdtemp(prefix="3rtpr_clip_bpe_")))
    return CLIPTokenizerFast(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))


def tokenize(tokenizer, captions: Sequence[str], context_length: int = CONTEXT_LENGTH
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """captions (N strings) -> (input_ids LongTensor[N, L], attention_mask LongTensor[N, L]), L = context_length.
    Each row is SOT w1 .. wn EOT, at most L-2 word tokens (truncated; EOT stays last), then pad id 0."""
    if isinstance(captions, str):
        captions = [captions]
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    max_words = context_length - 2
    input_ids = torch.zeros(len(encoded), context_length, dtype=torch.long)
    attention_mask = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, words in enumerate(encoded):
        ids = [SOT_TOKEN_ID] + list(words[:max_words]) + [EOT_TOKEN_ID]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
