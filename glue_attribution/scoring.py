"""What both scoring engines share (kronfluence's in influence.py, TRAK's in trak_scores.py): the splits sorted by
length for tight batches, the tracked modules, and publishing a score set in dataset order."""

import fnmatch
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import pipeline, results
from .errors import GlueError
from .scores import SCORES_META


def tracked_modules(model: nn.Module, patterns) -> list:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if patterns is None:
        return None
    chosen = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
    if not chosen:
        raise GlueError(f"--tracked_modules {' '.join(patterns)} matches no nn.Linear module "
                        f"(e.g. {names[0]}, {names[-1]})")
    return chosen


def publish_scores(work: str, root: str, public: str, meta: dict, orders: tuple) -> dict:
    """Maps the pairwise scores in `work` (computed on `sorted_splits`) to dataset order, publishes the folder as the
    score set `public`, and removes the private folder `root` it was computed in."""
    reorder_scores(os.path.join(work, "pairwise_scores.safetensors"), *orders)
    published = results.publish(work, public, SCORES_META, meta)
    shutil.rmtree(root, ignore_errors=True)
    results.clean_staging(public)
    return published


def reorder_scores(path: str, train_order: np.ndarray | None, query_order: np.ndarray | None = None) -> None:
    """Rewrites kronfluence's scores, computed on length-sorted data, in dataset order (in the private folder); a
    no-op for unsorted splits (orders None, --pad_to_max_length)."""
    if train_order is None:
        return
    tensors = {name: to_dataset_order(scores, train_order, query_order)
               for name, scores in load_file(path).items()}
    with results.atomic_path(path) as tmp:
        save_file(tensors, tmp)


def sorted_splits(config, tokenizer, train_text, query_text) -> tuple:
    """((train, query) tokenized, (train_order, query_order)): sorted by length for dynamic padding (each batch pads
    to a similar length; the scores are mapped back by the orders), unsorted with --pad_to_max_length (orders
    None)."""
    train_dataset, query_dataset = (
        pipeline.tokenize(d, config.dataset_name, tokenizer, config.max_seq_length, config.pad_to_max_length)
        for d in (train_text, query_text))
    if config.pad_to_max_length:
        return (train_dataset, query_dataset), (None, None)
    train_order, query_order = length_order(train_dataset), length_order(query_dataset)
    return (train_dataset.select(train_order), query_dataset.select(query_order)), (train_order, query_order)


def length_order(dataset) -> np.ndarray:
    """Indices sorting a tokenized split longest first, so padded batches are tight (and memory peaks early)."""
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    return np.argsort(-lengths, kind="stable")


def to_dataset_order(scores: torch.Tensor, train_order: np.ndarray, query_order: np.ndarray | None = None):
    """Undoes `length_order`: scores computed on sorted splits, indexed in dataset order (last axis: train)."""
    if query_order is not None:
        scores = scores[torch.from_numpy(np.argsort(query_order))]
    return scores[..., torch.from_numpy(np.argsort(train_order))].contiguous()
