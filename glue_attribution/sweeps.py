"""Retraining sweeps (the LDS ground truth, the counterfactual test): hundreds of fine-tunings with train.py's
recipe, split over processes and quiet enough that one progress bar tells the state."""

import logging
import time

import numpy as np
from datasets import Dataset

from . import pipeline, results
from .config import train_config
from .errors import GlueError


def shard(items: list, shard_index: int, num_shards: int) -> list:
    """Every `num_shards`-th item from `shard_index`: shards never overlap and together cover all items."""
    if not 0 <= shard_index < num_shards:
        raise GlueError(f"--shard_index must be in [0, {num_shards}), got {shard_index}")
    return items[shard_index::num_shards]


def claimed(items: list, path_of, done):
    """Yields the items of a sweep that this process computes, claiming each (a lock on `path_of(item)`) while it
    does: an item another process is computing is left to it and waited for at the end (computed here only if that
    process died first), so that two identical commands split the work, as two shards would. `done(item)`: its
    result is there (read after the claim: the other process may have just finished it)."""
    waiting = []
    for item in items:
        with results.lock(path_of(item), wait=False) as mine:
            if not mine:
                waiting.append(item)
                continue
            if not done(item):
                yield item
    for item in waiting:
        with results.lock(path_of(item)):
            if not done(item):
                yield item


def quiet_retrains() -> None:
    """Each retrain's model-load report, weight-loading bar and epoch losses would bury the progress bar over
    hundreds of retrains; keep warnings only."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("glue_attribution.pipeline").setLevel(logging.WARNING)


def retrainer(config, train_text: Dataset, query_text: Dataset, outputs: tuple = ("margins", "correct")):
    """retrain(keep, seed, queries=None): fine-tunes on the kept training examples with the train.py recipe and
    returns `outputs` of the queries (pipeline.evaluate's per-example arrays: by default the `margins` task.py
    measures and the `correct` flags; `seconds`: the retrain's wall time). Tokenizes once for all retrains of a
    sweep (LDS, counterfactual, the cross-validation and fix-and-retrain of detect_mislabeled.py)."""
    tokenizer = pipeline.load_tokenizer(config.model_name_or_path)
    train_dataset, query_dataset = (
        pipeline.tokenize(d, config.dataset_name, tokenizer, config.max_seq_length, config.pad_to_max_length)
        for d in (train_text, query_text))
    data_collator, recipe = pipeline.collator(tokenizer), train_config(config)
    device = pipeline.torch_device(config.device)
    quiet_retrains()

    def retrain(keep, seed: int, queries: list | None = None) -> dict:
        start = time.time()
        kept = train_dataset.select(np.asarray(keep).tolist())
        model = pipeline.finetune(config.model_name_or_path, config.dataset_name, kept, data_collator, recipe,
                                  seed=seed, device=device, disable_tqdm=True)
        measured = query_dataset if queries is None else query_dataset.select(queries)
        results = pipeline.evaluate(model, measured, data_collator, config.dataset_name, batch_size=64, device=device,
                                    bf16=config.bf16)
        results["seconds"] = np.array(time.time() - start)
        return {k: results[k] for k in outputs if k in results}  # regression: no correct flag

    return retrain
