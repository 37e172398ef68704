"""Finding mislabeled training data: rankings of the training set, most suspicious first, scored against the labels
that `train.py --label_noise` flipped (ROC AUC, average precision, the fraction of flips found in the top 5/10/20%).

The rankings: the self-influence of each score set (analyze.py --compute_self_scores) at the final model, after each
earlier epoch (`<name>_epoch<E>`, train.py --save_epoch_checkpoints) and summed along training (`<name>_trajectory`,
TracIn's idea: a flipped example is loud before it is memorised); `<name>_harm`, its harm to the held-out queries
of the score set (Hara et al. 2019); `loss`, the final model's training loss; `aum`, the area under the margin from
train.py's record of the training run; `cleanlab`, confident learning on out-of-sample probabilities from k-fold
cross-validated fine-tuning with the checkpoint's recipe (each fold one resumable run); `random`.
"""

import json
import logging
import os
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from . import pipeline, progress, results, sweeps
from .checkpoints import (
    CHECKPOINT_META,
    LABEL_NOISE,
    TRAINING_MARGINS,
    epoch_member,
    load_checkpoint,
    trained_checkpoints,
)
from .config import result_arguments
from .ensembles import combine, standardize
from .errors import GlueError
from .scores import load_scores, scores_dir

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


def cross_validated_probabilities(config, train_text, folder: str) -> tuple:
    """Out-of-sample class probabilities of every training example: fine-tune on the other folds (the checkpoint's
    recipe), predict the held-out one; and the folds' training seconds (None if unknown). Each fold is saved as it
    ends and reused after a restart; concurrent shards start at different folds."""
    n, classes = len(train_text), pipeline.get_task(config.dataset_name).num_labels
    folds = np.array_split(np.random.default_rng(config.seed).permutation(n), config.num_folds)
    probabilities, seconds, retrain = np.zeros((n, classes)), 0.0, None
    progress.stage("the cross-validation retrains", folder)
    start = config.shard_index * config.num_folds // config.num_shards
    for k in np.roll(np.arange(config.num_folds), -start).tolist():
        held_out = folds[k]
        path = os.path.join(folder, "runs", f"fold{k}.npz")
        run = results.load_run(path, {"probabilities": (len(held_out), classes)})
        if run is None:
            retrain = retrain or sweeps.retrainer(config, train_text, train_text, outputs=("probabilities", "seconds"))
            logger.info("Cross-validation: fold %d of %d", k + 1, config.num_folds)
            run = retrain(np.setdiff1d(np.arange(n), held_out), config.seed + k, held_out.tolist())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            results.save_arrays(path, **run)
        probabilities[held_out] = run["probabilities"]
        seconds = None if seconds is None or "seconds" not in run else seconds + float(run["seconds"])
    return probabilities, seconds  # None: a fold saved before retrains were timed


def cleanlab_suspicion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confident learning: the examples `find_label_issues` flags first (by self-confidence), then the rest."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)] = True
    return flagged.astype(float) + (1.0 - quality)  # quality is in [0, 1]: flagged examples rank first


def aum_suspicion(margins_seen: np.ndarray) -> np.ndarray:
    """The area under the margin (Pleiss et al. 2020), negated: a mislabeled example's assigned label keeps losing
    to another during training, so its margin averaged over the epochs is low even once it is memorised."""
    return -np.nanmean(margins_seen, axis=0)


def training_margins(config) -> np.ndarray | None:
    """The checkpoint's margins per epoch and example (train.py's training_margins.json), or None for a checkpoint
    written before train.py recorded them."""
    checkpoint = os.path.join(config.checkpoint_dir, config.dataset_name)
    if TRAINING_MARGINS not in results.read(checkpoint, CHECKPOINT_META, "checkpoint")["files"]:
        return None
    with open(os.path.join(checkpoint, TRAINING_MARGINS)) as f:
        return np.array(json.load(f)["margins"], dtype=float)  # null -> nan


def training_losses(config, train_text) -> np.ndarray:
    """The final model's loss on each of its (noisy) training examples."""
    model, tokenizer, _ = load_checkpoint(os.path.join(config.checkpoint_dir, config.dataset_name),
                                                   config.dataset_name)
    dataset = pipeline.tokenize(train_text, config.dataset_name, tokenizer, config.max_seq_length,
                                config.pad_to_max_length)
    evaluated = pipeline.evaluate(model, dataset, pipeline.collator(tokenizer), config.dataset_name, batch_size=64,
                                  device=pipeline.torch_device(config.device))
    return evaluated["losses"]


def verified_scores(config, name: str, train_text, kind: str, checkpoints: tuple, queries=None) -> tuple:
    """A score set's verified `kind` scores ("self" or "pairwise" on `queries`), computed on this (noisy) training
    set from `checkpoints` (checkpoints.trained_checkpoints: this checkpoint and its epochs); and the set's meta."""
    scores, meta = load_scores(config.output_dir, config.dataset_name, name, kind=kind, checkpoints=checkpoints)
    expected = {"dataset_name": config.dataset_name, "num_train": len(train_text),
                "train_data": pipeline.fingerprint(train_text), "max_seq_length": config.max_seq_length}
    if queries is not None:
        expected.update(num_query=len(queries), query_data=pipeline.fingerprint(queries))
    results.check_provenance(meta["provenance"], expected, f"scores '{name}'")
    return scores, meta


def held_out_harm(pairwise: np.ndarray) -> np.ndarray:
    """Each training example's harm to the held-out queries (Hara et al. 2019 cleanse by influence on validation
    data): minus its influence summed over the queries, each query's row standardised first so that no query
    dominates. A flipped example pulls the model away from the queries of its true class, whether or not the model
    has memorised it."""
    return -standardize(pairwise).sum(axis=0)


def harm_queries(config) -> int:
    """How many validation examples (the first ones) the score sets of --strategies scored: the held-out set of
    the harm rankings. Every set must have the same: the examples after them judge the cleaned models."""
    counts, checkpoints = {}, trained_checkpoints(config.checkpoint_dir, config.dataset_name)
    for name in config.strategies:
        _, meta = load_scores(config.output_dir, config.dataset_name, name, kind="self", checkpoints=checkpoints)
        counts[name] = meta["provenance"]["num_query"]
    if len(set(counts.values())) > 1:
        raise GlueError("the score sets scored different numbers of queries ("
                        + ", ".join(f"{name}: {n}" for name, n in counts.items())
                        + "); rerun analyze.py with one --max_query_examples for all of them")
    return next(iter(counts.values()))


def cost_seconds(meta: dict) -> float:
    """Seconds analyze.py spent on a score set (factors, scores and self scores together)."""
    return float(sum(v for k, v in meta.items() if k.endswith("_seconds")))


def epoch_names(config, name: str) -> list:
    """The score sets `<name>_epoch<E>` of the epochs before the last, if analyze.py made all of them."""
    names = [f"{name}_{epoch_member(e)}" for e in range(1, config.num_train_epochs)]
    present = [n for n in names if os.path.isdir(scores_dir(config.output_dir, config.dataset_name, n))]
    if present and len(present) < len(names):
        logger.warning("Skipping %s_trajectory: no scores %s yet (analyze.py --checkpoint_epoch E "
                       "--compute_self_scores for each epoch E before the last)", name,
                       ", ".join(sorted(set(names) - set(present))))
    return names if len(present) == len(names) else []


def summarize(paths: list) -> None:
    """Mean ± sd of every metric over several runs (noise seeds), as the table in docs/results.md, with the
    accuracies of the noisy and clean-label models."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            runs.append({})
        if not isinstance(runs[-1].get("results"), dict):
            raise GlueError(f"{path} is not a detection_results.json; run detect_mislabeled.py first")
    names = [name for name in runs[0]["results"] if all(name in run["results"] for run in runs)]
    metrics = list(dict.fromkeys(m for name in names for m in runs[0]["results"][name]))  # fixed@ where cleaned
    print(f"{len(runs)} runs: mean ± sd")
    print(f"{'ranking':<18}" + "".join(f"{m:>20}" for m in metrics))

    def cell(values):
        values = np.array(values, dtype=float)
        if np.isnan(values).all():  # a ranking the fix-and-retrain sweep did not clean with
            return f"{'-':>20}"
        return f"{f'{values.mean():.3f} ± {values.std(ddof=1 if len(values) > 1 else 0):.3f}':>20}"

    for name in names:
        print(f"{name:<18}" + "".join(cell([run["results"][name].get(m, np.nan) for run in runs]) for m in metrics))
    if all("fix_and_retrain" in run for run in runs):
        for model in ("noisy", "clean"):
            print(f"{model + ' model':<18}{cell([run['fix_and_retrain'][model] for run in runs])} (accuracy on the "
                  "judged validation examples)")


# ----------------------------------------------------------------------------------------------------------------------
# The experiment, as detect_mislabeled.py runs it

def detection_arguments(config) -> dict:
    """The arguments that change the results (not where they go, nor --summarize; the fix-and-retrain runs are
    named by ranking and fraction, so choosing others reuses the folder)."""
    return result_arguments(config, "detection_dir", "summarize", "fix_rankings", "fix_fractions")


def validation_split(config, num_held_out: int) -> tuple:
    """(held-out queries, judged examples): the first `num_held_out` validation examples, which the harm rankings
    read, and the rest, which judge the cleaned models and which no ranking has seen."""
    validation = pipeline.load_glue(config.dataset_name, pipeline.get_task(config.dataset_name).eval_splits[0],
                                    config.data_dir)
    if num_held_out >= len(validation):
        raise GlueError(f"the score sets use all {len(validation)} validation examples as queries, so none is left "
                        "to judge the cleaned models; rerun analyze.py with --max_query_examples below that "
                        f"(e.g. {len(validation) // 3})")
    return validation.select(range(num_held_out)), validation.select(range(num_held_out, len(validation)))


def detection_dir(config) -> str:
    """--detection_dir, or <output_dir>/<task>/detection_<digest of the arguments>."""
    return config.detection_dir or results.experiment_dir(os.path.join(config.output_dir, config.dataset_name),
                                                        "detection", detection_arguments(config))


def claim(folder: str, config) -> None:
    """Records the arguments in the results folder; refuses one built with other arguments."""
    results.claim_experiment(folder, detection_arguments(config), keep_both="another --detection_dir")


def flipped_labels(config, num_train: int) -> np.ndarray:
    """Which training labels `train.py --label_noise` flipped, from the verified checkpoint's label_noise.json."""
    checkpoint = os.path.join(config.checkpoint_dir, config.dataset_name)
    noise_path = os.path.join(checkpoint, LABEL_NOISE)
    if not os.path.isfile(noise_path):
        raise GlueError(f"no {noise_path}: train the checkpoint with train.py --label_noise (e.g. 0.1) first")
    results.read(checkpoint, CHECKPOINT_META, "checkpoint")  # verified, label_noise.json too
    with open(noise_path) as f:
        indices = [flip["index"] for flip in json.load(f)["flipped"]]
    flipped = np.zeros(num_train, dtype=bool)
    flipped[indices] = True
    return flipped


def rankings(config, train_text, held_out, folder: str) -> tuple:
    """({ranking: suspicion per training example}, {ranking: {seconds, retrains}}) for --strategies' self-influence
    (final, per epoch and along training where analysed), their harm to the `held_out` queries, and the baselines
    (aum where the checkpoint recorded its margins). Costs exclude the one training run every ranking reads."""
    suspicion, cost = {}, {}
    checkpoints = trained_checkpoints(config.checkpoint_dir, config.dataset_name)  # verified (hashed) once
    for name in config.strategies:
        suspicion[name], meta = verified_scores(config, name, train_text, "self", checkpoints)
        cost[name] = {"seconds": cost_seconds(meta), "retrains": 0}
    for name in config.strategies:
        epochs = epoch_names(config, name)
        for epoch in epochs:
            suspicion[epoch], meta = verified_scores(config, epoch, train_text, "self", checkpoints)
            cost[epoch] = {"seconds": cost_seconds(meta), "retrains": 0}
        if epochs:
            suspicion[f"{name}_trajectory"] = combine([*(suspicion[e] for e in epochs), suspicion[name]])
            cost[f"{name}_trajectory"] = {"seconds": sum(cost[e]["seconds"] for e in [*epochs, name]), "retrains": 0}
    for name in config.strategies:
        pairwise, meta = verified_scores(config, name, train_text, "pairwise", checkpoints, held_out)
        suspicion[f"{name}_harm"] = held_out_harm(pairwise)
        cost[f"{name}_harm"] = {"seconds": cost_seconds(meta), "retrains": 0}
    start = time.time()
    suspicion["loss"] = training_losses(config, train_text)
    cost["loss"] = {"seconds": time.time() - start, "retrains": 0}
    if (margins_seen := training_margins(config)) is not None:
        suspicion["aum"] = aum_suspicion(margins_seen)
        cost["aum"] = {"seconds": 0.0, "retrains": 0}
    labels = np.array(train_text["label"])
    probabilities, seconds = cross_validated_probabilities(config, train_text, folder)
    suspicion["cleanlab"] = cleanlab_suspicion(labels, probabilities)
    cost["cleanlab"] = {"seconds": seconds, "retrains": config.num_folds}
    suspicion["random"] = np.random.default_rng(config.seed).permutation(len(labels)).astype(float)
    cost["random"] = {"seconds": 0.0, "retrains": 0}
    return suspicion, cost


def ranking_names(config) -> list:
    """The names `rankings` will give, known before any of them is computed: --fix_rankings is checked against them
    before the first cross-validation fold trains."""
    epochs = [name for strategy in config.strategies for name in epoch_names(config, strategy)]
    epochs += [f"{name}_trajectory" for name in config.strategies if epoch_names(config, name)]
    aum = ["aum"] if training_margins(config) is not None else []
    return [*config.strategies, *epochs, *(f"{name}_harm" for name in config.strategies), "loss", *aum, "cleanlab",
            "random"]


def chosen(suspicion: dict, names: list | None) -> dict:
    """The rankings `names` (all when None) of `suspicion`; an unknown name is refused with the known ones."""
    if names is None:
        return suspicion
    if unknown := [name for name in names if name not in suspicion]:
        raise GlueError(f"--fix_rankings {' '.join(unknown)}: no such ranking; choose among {' '.join(suspicion)}")
    return {name: suspicion[name] for name in names}


def write_detection(folder: str, config, suspicion: dict, flipped: np.ndarray, labels, metrics: dict, cost: dict,
                    fixed: dict | None, num_held_out: int) -> str:
    """detection_results.json (metrics, costs, the fix-and-retrain sweep, arguments) and detection_rankings.csv;
    returns the JSON's path."""
    path = os.path.join(folder, "detection_results.json")
    record = {"num_train": len(flipped), "num_flipped": int(flipped.sum()), "results": metrics, "cost": cost,
              "held_out_queries": f"the first {num_held_out} validation examples (read by the harm rankings; the "
                                  "cleaned models are judged on the rest)", "arguments": detection_arguments(config)}
    if fixed is not None:
        record["fix_and_retrain"] = fixed
    results.atomic_write_json(record, path)
    results.write_csv(os.path.join(folder, "detection_rankings.csv"), ["index", "flipped", "label", *suspicion],
                      [[i, int(flipped[i]), labels[i], *(f"{s[i]:.6g}" for s in suspicion.values())]
                       for i in range(len(flipped))])
    return path
