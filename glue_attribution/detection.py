"""Finding mislabeled training data: rankings of the training set, most suspicious first, scored against the labels
that `train.py --label_noise` flipped (ROC AUC, average precision, the fraction of flips found in the top 5/10/20%).

The rankings: the self-influence of each score set (analyze.py --compute_self_scores); `loss`, the final model's
training loss; `aum`, the area under the margin from train.py's record of the training run; `cleanlab`, confident
learning on out-of-sample probabilities from k-fold cross-validated fine-tuning with the checkpoint's recipe (each
fold one resumable run); `random`.
"""

import json
import logging
import os

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

import pipeline

from . import progress, results, sweeps
from .cli import result_arguments, trained_checkpoints
from .errors import GlueError
from .scores import load_scores

logger = logging.getLogger(__name__)
BASELINE_RANKINGS = ("loss", "aum", "cleanlab", "random")
INSPECTED = (0.05, 0.10, 0.20)  # fractions of the training set a researcher reads, top of the ranking first
FLAGGED = 0.10  # the explorer flags the top 10% of each ranking (the flip rate of the README's experiment)


def detection_metrics(suspicion: np.ndarray, flipped: np.ndarray) -> dict:
    """ROC AUC, average precision and found@f (the fraction of all flips among the top f of the ranking) of a
    suspicion score (higher: more likely mislabeled) against the true flips."""
    order = np.argsort(-suspicion, kind="stable")
    found = {f"found@{round(100 * f)}%": float(flipped[order[:round(f * len(order))]].sum() / flipped.sum())
             for f in INSPECTED}
    return {"roc_auc": float(roc_auc_score(flipped, suspicion)),
            "average_precision": float(average_precision_score(flipped, suspicion)), **found}


def found_curve(suspicion: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Fraction of the flips found after inspecting the top 1, 2, ..., n examples."""
    return np.cumsum(flipped[np.argsort(-suspicion, kind="stable")]) / flipped.sum()


def cross_validated_probabilities(args, train_text, folder: str) -> np.ndarray:
    """Out-of-sample class probabilities of every training example: fine-tune on the other folds (the checkpoint's
    recipe), predict the held-out one. Each fold is saved as it ends and reused after a restart."""
    n, classes = len(train_text), pipeline.get_task(args.dataset_name).num_labels
    folds = np.array_split(np.random.default_rng(args.seed).permutation(n), args.num_folds)
    probabilities, retrain = np.zeros((n, classes)), None
    progress.stage("the cross-validation retrains", folder)
    for k, held_out in enumerate(folds):
        path = os.path.join(folder, "runs", f"fold{k}.npz")
        run = results.load_run(path, {"probabilities": (len(held_out), classes)})
        if run is None:
            retrain = retrain or sweeps.retrainer(args, train_text, train_text, outputs=("probabilities",))
            logger.info("Cross-validation: fold %d of %d", k + 1, args.num_folds)
            run = retrain(np.setdiff1d(np.arange(n), held_out), args.seed + k, held_out.tolist())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            results.save_arrays(path, **run)
        probabilities[held_out] = run["probabilities"]
    return probabilities


def cleanlab_suspicion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confident learning: the examples `find_label_issues` flags first (by self-confidence), then the rest."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")] = True
    return flagged.astype(float) + (1.0 - quality)  # quality is in [0, 1]: flagged examples rank first


def aum_suspicion(margins_seen: np.ndarray) -> np.ndarray:
    """The area under the margin (Pleiss et al. 2020), negated: a mislabeled example's assigned label keeps losing
    to another during training, so its margin averaged over the epochs is low even once it is memorised."""
    return -np.nanmean(margins_seen, axis=0)


def training_margins(args) -> np.ndarray | None:
    """The checkpoint's margins per epoch and example (train.py's training_margins.json), or None for a checkpoint
    written before train.py recorded them."""
    checkpoint = os.path.join(args.checkpoint_dir, args.dataset_name)
    if pipeline.TRAINING_MARGINS not in results.read(checkpoint, pipeline.CHECKPOINT_META, "checkpoint")["files"]:
        return None
    with open(os.path.join(checkpoint, pipeline.TRAINING_MARGINS)) as f:
        return np.array(json.load(f)["margins"], dtype=float)  # null -> nan


def training_losses(args, train_text) -> np.ndarray:
    """The final model's loss on each of its (noisy) training examples."""
    model, tokenizer, _ = pipeline.load_checkpoint(os.path.join(args.checkpoint_dir, args.dataset_name),
                                                   args.dataset_name)
    dataset = pipeline.tokenize(train_text, args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
    evaluated = pipeline.evaluate(model, dataset, pipeline.collator(tokenizer), args.dataset_name, batch_size=64,
                                  device=pipeline.torch_device(args.device))
    return evaluated["losses"]


def self_influence(args, name: str, train_text) -> np.ndarray:
    """A score set's verified self-influence, computed on this (noisy) training set."""
    scores, meta = load_scores(args.output_dir, args.dataset_name, name, kind="self",
                               checkpoints=trained_checkpoints(args.checkpoint_dir, args.dataset_name))
    expected = {"dataset_name": args.dataset_name, "num_train": len(train_text),
                "train_data": pipeline.fingerprint(train_text), "max_seq_length": args.max_seq_length}
    results.check_provenance(meta["provenance"], expected, f"scores '{name}'")
    return scores


def summarize(paths: list) -> None:
    """Mean ± sd of every metric over several runs (noise seeds), as the table in docs/results.md."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f)["results"])
        except (OSError, ValueError, KeyError):
            raise GlueError(f"{path} is not a detection_results.json; run detect_mislabeled.py first") from None
    metrics = list(next(iter(runs[0].values())))
    print(f"{len(runs)} runs: mean ± sd")
    print(f"{'ranking':<12}" + "".join(f"{m:>20}" for m in metrics))
    for name in runs[0]:
        values = np.array([[run[name][m] for m in metrics] for run in runs])
        print(f"{name:<12}" + "".join(f"{f'{mu:.3f} ± {sd:.3f}':>20}"
                                      for mu, sd in zip(values.mean(0), values.std(0, ddof=1 if len(runs) > 1 else 0))))




# ----------------------------------------------------------------------------------------------------------------------
# The experiment, as detect_mislabeled.py runs it

def detection_arguments(args) -> dict:
    """The arguments that change the results (not where they go, nor --summarize)."""
    return result_arguments(args, "detection_dir", "summarize")


def detection_dir(args) -> str:
    """--detection_dir, or <output_dir>/<task>/detection_<digest of the arguments>."""
    return args.detection_dir or results.experiment_dir(os.path.join(args.output_dir, args.dataset_name),
                                                        "detection", detection_arguments(args))


def claim(folder: str, args) -> None:
    """Records the arguments in the results folder; refuses one built with other arguments."""
    results.claim_experiment(folder, detection_arguments(args), keep_both="another --detection_dir")


def flipped_labels(args, num_train: int) -> np.ndarray:
    """Which training labels `train.py --label_noise` flipped, from the verified checkpoint's label_noise.json."""
    checkpoint = os.path.join(args.checkpoint_dir, args.dataset_name)
    noise_path = os.path.join(checkpoint, "label_noise.json")
    if not os.path.isfile(noise_path):
        raise GlueError(f"no {noise_path}: train the checkpoint with train.py --label_noise (e.g. 0.1) first")
    results.read(checkpoint, pipeline.CHECKPOINT_META, "checkpoint")  # verified, label_noise.json too
    with open(noise_path) as f:
        indices = [flip["index"] for flip in json.load(f)["flipped"]]
    flipped = np.zeros(num_train, dtype=bool)
    flipped[indices] = True
    return flipped


def rankings(args, train_text, folder: str) -> dict:
    """{ranking: suspicion per training example} for --strategies' self-influence and the baselines (aum where the
    checkpoint recorded its margins)."""
    suspicion = {name: self_influence(args, name, train_text) for name in args.strategies}
    suspicion["loss"] = training_losses(args, train_text)
    if (margins_seen := training_margins(args)) is not None:
        suspicion["aum"] = aum_suspicion(margins_seen)
    labels = np.array(train_text["label"])
    suspicion["cleanlab"] = cleanlab_suspicion(labels, cross_validated_probabilities(args, train_text, folder))
    suspicion["random"] = np.random.default_rng(args.seed).permutation(len(labels)).astype(float)
    return suspicion


def write_detection(folder: str, args, suspicion: dict, flipped: np.ndarray, labels, metrics: dict) -> str:
    """detection_results.json (metrics and arguments) and detection_rankings.csv; returns the JSON's path."""
    path = os.path.join(folder, "detection_results.json")
    results.atomic_write_json({"num_train": len(flipped), "num_flipped": int(flipped.sum()), "results": metrics,
                               "arguments": detection_arguments(args)}, path)
    results.write_csv(os.path.join(folder, "detection_rankings.csv"), ["index", "flipped", "label", *suspicion],
                      [[i, int(flipped[i]), labels[i], *(f"{s[i]:.6g}" for s in suspicion.values())]
                       for i in range(len(flipped))])
    return path
