"""The counterfactual test of influence scores: remove a query's most influential training examples, retrain, and
see whether its prediction flips (the seed's RTE experiment, with a random same-label baseline).

Every retrain is one small file (runs/<method>/q<query>_k<k>_s<seed>.npz, runs/base_s<seed>.npz), written as it
ends and reused after a restart; the queries are split over shards, and the shard that finishes last gathers every
shard's runs into the results.
"""

import json
import logging
import os

import numpy as np
from tqdm.auto import tqdm

from . import pipeline, progress, results, sweeps
from .checkpoints import trained_checkpoints
from .config import result_arguments
from .errors import GlueError
from .scores import load_scores, source_of

logger = logging.getLogger(__name__)
RANDOM = "random"
FLIP_BELOW = 0.5  # a query is flipped once its mean accuracy over the retrains drops below this
RESULTS_JSON = "counterfactual_results.json"
QUERY_RESAMPLES = 1000  # bootstrap resamples of the queries, for the intervals


def results_dir(config) -> str:
    """<output_dir>/<task>/counterfactual_<digest of the result-changing arguments> (or --counterfactual_dir)."""
    if config.counterfactual_dir is not None:
        return config.counterfactual_dir
    return results.experiment_dir(os.path.join(config.output_dir, config.dataset_name), "counterfactual",
                                  experiment_arguments(config))


def experiment_arguments(config, rankings: dict | None = None) -> dict:
    """The arguments that change the results (with `rankings`, also a digest of what each method removes)."""
    chosen = result_arguments(config, "counterfactual_dir", "plot_only", "reference")
    if chosen.get("search") == "ascending":  # the seed's order keeps the folder name it had before --search
        del chosen["search"]
    if rankings is not None:
        chosen["rankings"] = rankings_fingerprint(rankings, config.remove_intervals[-1])
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# Rankings: which training examples to remove first, per query

def influence_ranking(scores: np.ndarray) -> np.ndarray:
    """Training indices, most positively influential first: removing them should lower the query's margin."""
    return np.argsort(-scores, kind="stable")


def random_ranking(train_labels: np.ndarray, label: int, seed: int, query: int) -> np.ndarray:
    """The baseline: the training examples with the query's label, shuffled with (seed, query), so the top k are k
    random same-label examples and larger k extend smaller ones, as in the influence rankings."""
    return np.random.default_rng([seed, query]).permutation(np.flatnonzero(train_labels == label))


def load_rankings(config, train_text, query_labels: list) -> tuple:
    """({method: [ranking of query 0, 1, ...]}, {method: what its scores were computed from}) for --strategies (from
    analyze.py's scores, verified, computed on this training set and these queries, and from the checkpoint in
    --checkpoint_dir when there is one) and the random baseline."""
    train_labels, n_query = np.array(train_text["label"]), len(query_labels)
    checkpoints = trained_checkpoints(config.checkpoint_dir, config.dataset_name)
    rankings, used = {}, {}
    for name in dict.fromkeys(m for m in config.strategies if m != RANDOM):
        scores, meta = load_scores(config.output_dir, config.dataset_name, name, checkpoints=checkpoints)
        used[name] = source_of(meta)
        if scores.shape[0] < n_query:
            raise GlueError(f"scores '{name}' cover {scores.shape[0]} queries, fewer than --max_query_examples "
                            f"{n_query}; lower --max_query_examples or rerun analyze.py with more queries")
        scored_queries = pipeline.load_glue(config.dataset_name, pipeline.get_task(config.dataset_name).eval_splits[0],
                                            config.data_dir, scores.shape[0])
        results.check_provenance(meta["provenance"], pipeline.data_provenance(
            config.dataset_name, train_text, scored_queries, config.max_seq_length), f"scores '{name}'")
        rankings[name] = [influence_ranking(row) for row in scores[:n_query]]
    rankings[RANDOM] = [random_ranking(train_labels, y, config.seed, q) for q, y in enumerate(query_labels)]
    return rankings, used


def reference_ranking(requested: str | None, rankings: dict) -> str:
    """The ranking every other is compared with, paired: --reference, else the first score set of
    --strategies (the random baseline comes last)."""
    if requested is not None and requested not in rankings:
        raise GlueError(f"--reference {requested} is not among the rankings ({', '.join(rankings)}); add it to "
                        "--strategies")
    return requested or next(iter(rankings))


def check_intervals(intervals: list, rankings: dict, n_train: int, batch_size: int) -> None:
    """Fail before any training if the largest k cannot be removed."""
    k = intervals[-1]
    if n_train - k < batch_size:
        raise GlueError(f"--remove_intervals {k} leaves {n_train - k} of {n_train} training examples, less "
                        f"than one batch of {batch_size}; remove fewer or use a larger --max_train_samples")
    for method, per_query in rankings.items():
        for query, ranking in enumerate(per_query):
            if len(ranking) < k:
                raise GlueError(f"--remove_intervals {k}: query {query} has only {len(ranking)} training "
                                f"examples that '{method}' can remove (random: those with its label)")


def rankings_fingerprint(rankings: dict, k: int) -> dict:
    """A digest of what each method removes, so a results folder refuses runs made from other scores."""
    return {method: results.array_digest(np.stack([r[:k] for r in per_query]).astype(np.int64))
            for method, per_query in rankings.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Retraining

def query_accuracy(retrain, prefix: str, removed, n_train: int, seeds, queries) -> np.ndarray | None:
    """The one experiment: remove `removed`, retrain each seed, return each query's accuracy averaged over seeds.

    Each retrain is saved as `<prefix>_s<seed>.npz` as it ends and reused after a restart. With `retrain=None`
    only saved runs are read, and None means one is missing (how the shards' results are gathered).
    """
    def load(seed):
        return results.load_run(f"{prefix}_s{seed}.npz", {"correct": (len(queries),)})  # damaged: deleted, redone

    if retrain is not None:  # each run claimed while it trains: two identical commands split the base models too
        for seed in sweeps.claimed(list(seeds), lambda seed: f"{prefix}_s{seed}", lambda seed: load(seed) is not None):
            keep = np.setdiff1d(np.arange(n_train), removed)
            results.save_arrays(f"{prefix}_s{seed}.npz", **retrain(keep, int(seed), list(queries)))
    correct = []
    for seed in seeds:
        run = load(seed)
        if run is None:
            return None
        correct.append(run["correct"])
    return np.mean(correct, axis=0)


def query_outcome(retrain, folder: str, ranking: np.ndarray, query: int, intervals: list, seeds,
                  n_train: int, search: str = "ascending") -> list | None:
    """One query under one ranking: per k, the mean accuracy without the top k and whether it has flipped.

    A query counts as flipped from the smallest k whose accuracy is below 0.5 on, so it is enough to find that k.
    `ascending` (the seed) trains every k from the smallest until one flips; `bisect` halves the untested range each
    time (ceil(log2(len(intervals) + 1)) experiments, each with every seed, instead of up to len(intervals)). Both
    rest on the early stop's assumption that removing more examples does not undo a flip; k values that were not
    trained have accuracy None. Returns None when reading only (`retrain=None`) and a run is missing.
    """
    accuracies, low, high = {}, 0, len(intervals)  # the smallest flipped index lies in [low, high]
    while low < high:
        i = low if search == "ascending" else (low + high) // 2
        accuracy = query_accuracy(retrain, os.path.join(folder, f"q{query}_k{intervals[i]}"), ranking[:intervals[i]],
                                  n_train, seeds, [query])
        if accuracy is None:
            return None
        accuracies[i] = float(accuracy[0])
        low, high = (low, i) if accuracies[i] < FLIP_BELOW else (i + 1, high)
    return [{"query": query, "k": k, "accuracy": accuracies.get(i), "flipped": i >= low}
            for i, k in enumerate(intervals)]


def run_experiment(config, rankings: dict, n_train: int, retrain) -> dict | None:
    """Base filter, this shard's queries, then every shard's outcomes -- or None while another shard still runs."""
    runs = os.path.join(results_dir(config), "runs")
    for method in rankings:
        os.makedirs(os.path.join(runs, method), exist_ok=True)
    progress.stage("the counterfactual retrains", runs)
    candidates = list(range(len(rankings[RANDOM])))
    mine = sweeps.shard(candidates, config.shard_index, config.num_shards)

    # Every shard needs all base models; starting at a different one lets concurrent shards split the work.
    base_seeds = np.roll(config.seed + np.arange(config.num_base_repeat), -config.shard_index)
    base = query_accuracy(retrain, os.path.join(runs, "base"), [], n_train, base_seeds, candidates)
    queries = [q for q in candidates if base[q] == 1.0]
    if not queries:
        raise GlueError(f"no query passes the base filter: none of the {len(candidates)} candidates is "
                        f"classified correctly by all {config.num_base_repeat} base models; train better "
                        "(e.g. --learning_rate, --num_train_epochs) or raise --max_query_examples")
    passing = set(queries)
    my_queries = [q for q in mine if q in passing]
    logger.info("%d of %d candidate queries pass the base filter; this shard tests %d of them", len(queries),
                len(candidates), len(my_queries))

    seeds = config.seed + np.arange(config.num_repeat)

    def outcome(method, query, train):
        return query_outcome(train, os.path.join(runs, method), rankings[method][query], query,
                             config.remove_intervals, seeds, n_train, config.search)

    # Queries outermost: an interrupted run has every method's outcome for the queries it finished. Each query is
    # claimed while it is tested, so that two identical commands split the queries.
    claimed = sweeps.claimed(my_queries, lambda query: os.path.join(runs, f"q{query}"),
                             lambda query: all(outcome(method, query, None) is not None for method in rankings))
    for query in tqdm(claimed, total=len(my_queries), desc="Queries"):
        for method in rankings:
            outcome(method, query, retrain)

    rows = []
    for method in rankings:
        for query in queries:
            found = outcome(method, query, None)
            if found is None:
                logger.info("Shard %d done; results are gathered when the last shard finishes (or rerun the command)",
                            config.shard_index)
                return None
            rows += [{"method": method, **row} for row in found]
    flips = {method: np.array([[r["flipped"] for r in rows if r["method"] == method and r["k"] == k]
                               for k in config.remove_intervals], dtype=float) for method in rankings}
    return {"task": config.dataset_name, "num_train": n_train, "remove_intervals": config.remove_intervals,
            "num_base_repeat": config.num_base_repeat, "num_repeat": config.num_repeat, "search": config.search,
            "num_candidates": len(candidates),
            "queries": queries, "base_accuracy": base.tolist(),
            "flip_fraction": {method: f.mean(axis=1).tolist() for method, f in flips.items()},
            **flip_intervals(flips, reference_ranking(config.reference, rankings), QUERY_RESAMPLES, config.seed),
            "outcomes": rows}


def flip_intervals(flips: dict, reference: str, num_bootstrap: int, seed: int) -> dict:
    """95% bootstrap intervals over queries of each method's flip fraction at each k, and of its paired difference
    from `reference` (the same query resamples for every method). `flips`: {method: (k, queries) 0/1 flipped}."""
    rng = np.random.default_rng(seed)
    num_queries = next(iter(flips.values())).shape[1]
    picks = [rng.integers(0, num_queries, num_queries) for _ in range(num_bootstrap)]
    boot = {method: np.stack([f[:, p].mean(axis=1) for p in picks]) for method, f in flips.items()}  # (B, k)

    def interval(resampled):
        return np.percentile(resampled, [2.5, 97.5], axis=0).T.tolist()  # per k: [low, high]

    return {"flip_fraction_ci95": {method: interval(b) for method, b in boot.items()},
            "versus": {method: {"reference": reference,
                                "mean": (flips[method].mean(axis=1) - flips[reference].mean(axis=1)).tolist(),
                                "ci95": interval(boot[method] - boot[reference])}
                       for method in flips if method != reference}}


# ----------------------------------------------------------------------------------------------------------------------
# Results

def write_outcomes(counterfactual: dict, output_dir: str) -> str:
    """The JSON (everything), the per-query outcomes and the flip-fraction table as CSV; returns the JSON's path."""
    path = os.path.join(output_dir, RESULTS_JSON)
    results.atomic_write_json(counterfactual, path)
    results.write_csv(os.path.join(output_dir, "counterfactual_outcomes.csv"),
                      ["method", "query", "k", "accuracy", "flipped"],
                      [[r["method"], r["query"], r["k"], "" if r["accuracy"] is None else r["accuracy"],
                        int(r["flipped"])] for r in counterfactual["outcomes"]])
    methods = list(counterfactual["flip_fraction"])
    results.write_csv(os.path.join(output_dir, "counterfactual_flip_fraction.csv"), ["k", *methods],
                      [[k, *(f"{counterfactual['flip_fraction'][m][i]:.4f}" for m in methods)]
                       for i, k in enumerate(counterfactual["remove_intervals"])])
    return path


def read_results(folder: str) -> dict:
    """The gathered results of a finished experiment (what --plot_only draws)."""
    path = os.path.join(folder, RESULTS_JSON)
    if not os.path.isfile(path):
        raise GlueError(f"no results at {path}; run run_counterfactual.py (every shard) first")
    with open(path) as f:
        return json.load(f)
