"""The evaluation engine of 3RTPR (docs/method.md §8, §9), used by eval_3rtpr.py and by training's validation.

    features     extract_pair_features -> PairFeatures (runtime.encoding.encode), score_pair_features
    evaluate     evaluate_pair (rows of a pair in memory), evaluate_checkpoint (-> reporting.evaluation.CheckpointResult)
    checkpoints  resolve_checkpoint (run folder: best/, else last/; or a pair folder), load_pair,
                 load_eval_split, EvalInputError
    search       GalleryIndex (cached on disk), search_gallery, save_search_grid
    folder_gallery  any folder of images as a search gallery: update_folder_index (incremental, on disk)

Rows: "A/GE" ... "A+B/GE+FS" (modeling.pair.ROW_KEYS), "i2t:" for image->text; metrics in percent.
"""
from .checkpoints import Checkpoint, EvalInputError, load_eval_split, load_pair, resolve_checkpoint
from .evaluate import evaluate_checkpoint, evaluate_pair
from .features import PairFeatures, extract_pair_features, score_pair_features
from .folder_gallery import FolderIndex, check_gallery_folder, folder_cache_stem, update_folder_index, warn_unreadable
from .search import (GalleryIndex, build_gallery_index, load_gallery_index, save_gallery_index, save_search_grid,
                     search_cache_dir, search_cache_key, search_gallery, search_grid_path)

__all__ = ["Checkpoint", "EvalInputError", "load_eval_split", "load_pair", "resolve_checkpoint",
           "evaluate_checkpoint", "evaluate_pair", "PairFeatures", "extract_pair_features",
           "score_pair_features", "GalleryIndex", "build_gallery_index", "load_gallery_index",
           "save_gallery_index", "save_search_grid", "search_cache_dir", "search_cache_key", "search_gallery",
           "search_grid_path", "FolderIndex", "check_gallery_folder", "folder_cache_stem", "update_folder_index",
           "warn_unreadable"]
