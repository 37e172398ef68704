"""Fix and retrain, the number a user cares about (Koh & Liang 2017, "fixing mislabeled examples"): drop the top of
each ranking from the noisy training set, fine-tune on the rest with the checkpoint's recipe, and measure accuracy
on validation examples that no ranking read; beside the model trained on every noisy label and the one trained on
the clean labels. All retrains share one seed, so their differences are the removed examples'. Each retrain is one
resumable file (recording what it removed, so a changed ranking is retrained); shards split them.
"""

import logging
import os

import numpy as np
from tqdm.auto import tqdm

from . import progress, results, sweeps
from .failpoints import failpoint

logger = logging.getLogger(__name__)
BASELINES = ("noisy", "clean")  # every noisy label kept; the labels before train.py --label_noise flipped them


def fixed_key(fraction: float) -> str:
    """The metric of a ranking's cleaned model: accuracy after dropping its top `fraction`."""
    return f"fixed@{round(100 * fraction)}%"


def run_name(ranking: str, fraction: float) -> str:
    """A cleaned model's run: its ranking and the share of the training set it dropped, e.g. aum@10%."""
    return f"{ranking}@{round(100 * fraction)}%"


def removals(suspicion: dict, fractions: list) -> dict:
    """{run name: training indices to drop}: the baselines (none dropped) and each ranking's top of each fraction."""
    runs = {name: np.array([], dtype=int) for name in BASELINES}
    for name, s in suspicion.items():
        order = np.argsort(-s, kind="stable")
        for f in fractions:
            runs[run_name(name, f)] = np.sort(order[:round(f * len(s))])
    return runs


def fix_and_retrain(config, noisy_text, clean_text, judged, suspicion: dict, folder: str) -> dict | None:
    """This shard's retrains, then every run's accuracy on `judged`: {"noisy", "clean", "rankings": {ranking:
    {fixed@f: accuracy}}, "recovered": {ranking: {fixed@f: share of the accuracy lost to the noise won back}}}.
    None while another shard's runs are missing."""
    runs = removals(suspicion, config.fix_fractions)
    path = os.path.join(folder, "runs", "fix")
    os.makedirs(path, exist_ok=True)
    progress.stage("the fix-and-retrain retrains", path)
    retrainers = {}  # one per training set (tokenised once)

    def accuracy(name: str, train: bool) -> float | None:
        run = results.load_run(os.path.join(path, f"{name}.npz"), {"correct": (len(judged),)})
        if run is not None and not np.array_equal(run.get("removed"), runs[name]):
            logger.info("Redoing %s: its ranking changed since it was retrained", name)
            run, train = None, True  # whichever shard sees it first: a stale run is never gathered
        if run is None and train:
            labels = "clean" if name == "clean" else "noisy"
            if labels not in retrainers:
                retrainers[labels] = sweeps.retrainer(config, clean_text if labels == "clean" else noisy_text, judged)
            run = {**retrainers[labels](np.setdiff1d(np.arange(len(noisy_text)), runs[name]), config.seed),
                   "removed": runs[name]}  # what the run is of: checked when it is read again
            results.save_arrays(os.path.join(path, f"{name}.npz"), **run)
            failpoint("fix_retrained")
        return None if run is None else float(run["correct"].mean())

    for name in tqdm(sweeps.shard(list(runs), config.shard_index, config.num_shards), desc="Fix and retrain"):
        accuracy(name, train=True)
    measured = {name: accuracy(name, train=False) for name in runs}
    if None in measured.values():
        logger.info("Shard %d done; the results are gathered when the last shard finishes (or rerun the command)",
                    config.shard_index)
        return None
    noisy, clean = measured["noisy"], measured["clean"]
    fixed = {name: {fixed_key(f): measured[run_name(name, f)] for f in config.fix_fractions}
             for name in suspicion}
    lost = clean - noisy
    return {"num_judged": len(judged), "seed": config.seed, "noisy": noisy, "clean": clean, "rankings": fixed,
            "recovered": {name: {k: (a - noisy) / lost if lost > 0 else None for k, a in row.items()}
                          for name, row in fixed.items()}}
