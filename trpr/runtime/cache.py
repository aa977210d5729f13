"""The one cache root of the project and its sub-folders (what is cached where):

    $TRPR_CACHE (else ~/.cache/3rtpr)/
      SYNTH-PEDES-<preset>/, proxy corpora and proxy CLIPs   generated data sets and models (data, experiments)
      clip_bpe/          the tokenizer's vocab.json / merges.txt derived from the bundled BPE (data.tokenizer)
      image_checks/      verdicts of data.verify_images (data.images)
      search-features/   gallery features of search (evaluation.search, evaluation.folder_gallery)
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRPR_CACHE"
TOKENIZER_SUBDIR = "clip_bpe"
IMAGE_CHECKS_SUBDIR = "image_checks"
SEARCH_FEATURES_SUBDIR = "search-features"


def cache_root() -> Path:
    """`$TRPR_CACHE`, else `~/.cache/3rtpr` (read at every call: tests and commands may change it)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "3rtpr")


def tokenizer_cache_dir() -> Path:
    """`<cache_root()>/clip_bpe`: the derived CLIP vocabulary files."""
    return cache_root() / TOKENIZER_SUBDIR


def image_checks_dir() -> Path:
    """`<cache_root()>/image_checks`: cached verdicts of the image check."""
    return cache_root() / IMAGE_CHECKS_SUBDIR


def search_features_dir() -> Path:
    """`<cache_root()>/search-features`: gallery features of search (benchmark and folder galleries)."""
    return cache_root() / SEARCH_FEATURES_SUBDIR
