"""Scores of an ensemble: one score set per fine-tuning seed, combined into one.

One checkpoint's LDS is a draw: on the SST-2 slice of docs/results.md, ekfac scores 0.11 to 0.29 for eight seeds of
the same recipe. The ground truth averages over retrains with fresh seeds, so the scores should too. Members are
combined as the mean of their per-query standardised scores: each query's row is divided by its standard deviation
over the training examples first, because the raw magnitudes differ between seeds (2x there; the damped inverse of a
nearly singular curvature), so a raw mean leans on one member. Measured there, 4 models: 0.263 standardised, 0.243
raw mean, 0.166 mean of ranks.
"""

import logging
import os

import numpy as np

from . import results
from .errors import GlueError
from .scores import SCORES_META, ensemble_name, load_scores, scores_dir

logger = logging.getLogger(__name__)
def standardize(scores: np.ndarray) -> np.ndarray:
    """Each query's row (the last axis: training examples) scaled to unit standard deviation; a constant row stays
    zero. What makes score sets of different magnitude (seeds, epochs, queries) comparable before they are summed."""
    scale = scores.std(axis=-1, keepdims=True, dtype=np.float64)
    return np.divide(scores, scale, out=np.zeros(scores.shape), where=scale > 0)


def combine(members: list) -> np.ndarray:
    """Mean over members of each (queries x train) score matrix, every query's row standardised first."""
    return (sum(standardize(scores) for scores in members) / len(members)).astype(np.float32)


def publish_ensemble(output_dir: str, task_name: str, scores_name: str, members: list,
                     overwrite: bool = False) -> tuple:
    """Combines the published member score sets `members` [(seed, member scores name)] into the set
    `<scores_name>_ens<N>`, with the members' provenance (identical data, by construction) and their names and
    digests, so a reader can check what was averaged. Reused while the members are unchanged, recomputed (it is
    cheap) when they are not. Returns (name, meta)."""
    from safetensors.numpy import save_file

    combined_name = ensemble_name(scores_name, len(members))
    public = scores_dir(output_dir, task_name, combined_name)
    loaded = [(seed, name, *load_scores(output_dir, task_name, name)) for seed, name in members]
    signature = {"members": [{"seed": seed, "scores_name": name,
                              "sha256": meta["files"]["pairwise_scores.safetensors"]["sha256"]}
                             for seed, name, _, meta in loaded], "combine": "mean of per-query standardised scores"}
    first = loaded[0][3]
    with results.lock(public):
        try:
            meta = results.reuse(public, SCORES_META, "scores", signature, overwrite)
        except GlueError:  # other members (or recomputed ones): derived data, replaced
            logger.info("Replacing %s: its members changed", public)
            meta = None
        if meta is not None:
            return combined_name, meta
        staging = results.staging_dir(public, signature)
        os.makedirs(staging, exist_ok=True)
        scores = combine([scores for _, _, scores, _ in loaded])
        save_file({"all_modules": scores}, os.path.join(staging, "pairwise_scores.safetensors"))
        meta = {"signature": signature, "provenance": first["provenance"], "order": "dataset",
                "scores_name": combined_name, "strategy": first.get("strategy"), "ensemble": signature["members"],
                "checkpoint_sha256": [m["provenance"].get("checkpoint_sha256") for *_, m in loaded],
                "shape": list(scores.shape),
                "member_seconds": sum(m.get(k, 0) for *_, m in loaded for k in m if k.endswith("_seconds"))}
        meta = results.publish(staging, public, SCORES_META, meta)
        results.clean_staging(public)
    return combined_name, meta
