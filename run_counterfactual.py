"""Counterfactual test of influence scores: remove a query's most influential training examples, retrain, and count
how often its prediction flips (the seed's RTE experiment, with a random baseline that draws training examples).

Candidates are the first --max_query_examples validation examples (the first queries analyze.py scored); only those that
every base model (--num_base_repeat seeds, full training set) classifies correctly are tested. For each such query and
each ranking of the training set -- a score set from analyze.py, most positive first, and the random baseline (random
training examples with the query's label) -- the top k are removed for each k in --remove_intervals and the model is
retrained with --num_repeat seeds (train.py's recipe and flags). The query is flipped at the smallest k where its mean
accuracy drops below 0.5; larger k then count as flipped without training (the seed's early stop).

    python train.py --dataset_name rte
    python analyze.py --dataset_name rte --factor_strategy ekfac
    python analyze.py --dataset_name rte --factor_strategy identity
    python run_counterfactual.py --dataset_name rte --strategies ekfac identity

The data, model and recipe are the checkpoint's (--checkpoint_dir, as train.py wrote it); the scores are analyze.py's
in --output_dir. Offline, at CPU scale, after the README's train.py and analyze.py commands:

    python run_counterfactual.py --dataset_name sst2 --checkpoint_dir runs/checkpoints \
        --output_dir runs/influence_results --max_query_examples 8 --num_base_repeat 2 --num_repeat 1 \
        --remove_intervals 25 50 100

Results go to <output_dir>/<dataset_name>/counterfactual_<hash of the arguments>/ (or --counterfactual_dir). Every
retrain is saved there as it ends (runs/), so rerunning the command redoes nothing finished. Shard the queries over
processes with --shard_index/--num_shards or torchrun (each process takes cuda:LOCAL_RANK):

    torchrun --nproc_per_node 8 run_counterfactual.py --dataset_name rte --strategies ekfac identity

The process that finishes last gathers every shard's runs into counterfactual_results.json,
counterfactual_outcomes.csv (per query and k) and counterfactual_flip_fraction.csv, and draws --figure (default:
counterfactual.png beside them) from the JSON; `--plot_only` redraws the figure from the JSON alone.
"""


import cli

RANDOM = "random"
FLIP_BELOW = 0.5  # a query is flipped once its mean accuracy over the retrains drops below this
RESULTS_JSON = "counterfactual_results.json"
# Arguments that do not change any result, so a results folder may be resumed or merged with other values.
NOT_RESULTS = ("shard_index", "num_shards", "device", "output_dir", "counterfactual_dir", "figure", "plot_only",
               "verbose", "checkpoint_dir", "configured_by", "overrides")


def parse_args(argv=None):
    parser = cli.parser("Counterfactual evaluation of influence scores on a GLUE task.")
    cli.add_data_args(parser, checkpoint=True)
    cli.add_training_args(parser, checkpoint=True)
    cli.add_shard_args(parser)
    parser.add_argument("--strategies", "--methods", nargs="+", default=["ekfac", "identity"],
                        help="Score sets written by analyze.py (e.g. ekfac identity kfac diagonal ekfac_half); "
                             "the random baseline always runs as well.")
    parser.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's scores, and these results in <output_dir>/<dataset_name>/.")
    parser.add_argument("--counterfactual_dir", default=None,
                        help="Results folder (default: <output_dir>/<dataset_name>/counterfactual_<hash of the "
                             "arguments>).")
    parser.add_argument("--max_query_examples", "--num_target", type=cli.positive_int, default=100,
                        help="Candidate queries: the first N validation examples.")
    parser.add_argument("--remove_intervals", type=cli.positive_int, nargs="+", default=[20, 40, 60, 80, 100, 120],
                        help="How many top-ranked training examples to remove (k).")
    parser.add_argument("--num_base_repeat", type=cli.positive_int, default=5,
                        help="Base models on the full training set; a query is tested only if all get it right.")
    parser.add_argument("--num_repeat", type=cli.positive_int, default=3,
                        help="Retrains (seeds) per query, method and k.")
    parser.add_argument("--seed", type=int, default=1004,
                        help="Retrain i uses seed + i (base models and removals alike); also seeds the baseline.")
    parser.add_argument("--figure", default=None, help="Where the figure goes (default: beside the results).")
    parser.add_argument("--plot_only", action="store_true",
                        help=f"Redraw --figure from the results folder's {RESULTS_JSON} and exit.")
    args = parser.parse_args(argv)
    args.remove_intervals = sorted(set(args.remove_intervals))
    return cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)


if __name__ == "__main__":
    cli.cli(parse_args)  # --help and argument errors answer here, before the heavy imports below

import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import artifacts  # noqa: E402
import pipeline  # noqa: E402
import sweeps  # noqa: E402
from cli import UserError  # noqa: E402

logger = logging.getLogger("run_counterfactual")


def results_dir(args) -> str:
    """<output_dir>/<task>/counterfactual_<digest of the result-changing arguments> (or --counterfactual_dir)."""
    if args.counterfactual_dir is not None:
        return args.counterfactual_dir
    arguments = {k: v for k, v in vars(args).items() if k not in NOT_RESULTS}
    return os.path.join(args.output_dir, args.dataset_name, f"counterfactual_{artifacts.digest(arguments)}")


# ----------------------------------------------------------------------------------------------------------------------
# Rankings: which training examples to remove first, per query

def influence_ranking(scores: np.ndarray) -> np.ndarray:
    """Training indices, most positively influential first: removing them should lower the query's margin."""
    return np.argsort(-scores, kind="stable")


def random_ranking(train_labels: np.ndarray, label: int, seed: int, query: int) -> np.ndarray:
    """The baseline: the training examples with the query's label, shuffled with (seed, query), so the top k are k
    random same-label examples and larger k extend smaller ones, as in the influence rankings."""
    return np.random.default_rng([seed, query]).permutation(np.flatnonzero(train_labels == label))


def load_rankings(args, train_text, query_labels: list) -> dict:
    """{method: [ranking of query 0, 1, ...]} for --strategies (from analyze.py's scores, verified and computed on this
    training set and these queries) and the random baseline."""
    train_labels, n_query = np.array(train_text["label"]), len(query_labels)
    rankings = {}
    for name in dict.fromkeys(m for m in args.strategies if m != RANDOM):
        scores, meta = artifacts.load_scores(args.output_dir, args.dataset_name, name)
        if scores.shape[0] < n_query:
            raise UserError(f"scores '{name}' cover {scores.shape[0]} queries, fewer than --max_query_examples "
                            f"{n_query}; lower --max_query_examples or rerun analyze.py with more queries")
        scored_queries = pipeline.load_glue(args.dataset_name, pipeline.get_task(args.dataset_name).eval_splits[0],
                                            args.data_dir, scores.shape[0])
        artifacts.check_provenance(meta["provenance"], pipeline.data_provenance(
            args.dataset_name, train_text, scored_queries, args.max_seq_length), f"scores '{name}'")
        rankings[name] = [influence_ranking(row) for row in scores[:n_query]]
    rankings[RANDOM] = [random_ranking(train_labels, y, args.seed, q) for q, y in enumerate(query_labels)]
    return rankings


def check_intervals(intervals: list, rankings: dict, n_train: int, batch_size: int) -> None:
    """Fail before any training if the largest k cannot be removed."""
    k = intervals[-1]
    if n_train - k < batch_size:
        raise UserError(f"--remove_intervals {k} leaves {n_train - k} of {n_train} training examples, less "
                        f"than one batch of {batch_size}; remove fewer or use a larger --max_train_samples")
    for method, per_query in rankings.items():
        for query, ranking in enumerate(per_query):
            if len(ranking) < k:
                raise UserError(f"--remove_intervals {k}: query {query} has only {len(ranking)} training "
                                f"examples that '{method}' can remove (random: those with its label)")


def rankings_fingerprint(rankings: dict, k: int) -> dict:
    """A digest of what each method removes, so a results folder refuses runs made from other scores."""
    return {method: hashlib.sha256(np.stack([r[:k] for r in per_query]).astype(np.int64).tobytes()).hexdigest()[:16]
            for method, per_query in rankings.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Retraining

def query_accuracy(retrain, prefix: str, removed, n_train: int, seeds, queries) -> np.ndarray | None:
    """The one experiment: remove `removed`, retrain each seed, return each query's accuracy averaged over seeds.

    Each retrain is saved as `<prefix>_s<seed>.npz` as it ends and reused after a restart. With `retrain=None`
    only saved runs are read, and None means one is missing (how the shards' results are gathered).
    """
    correct = []
    for seed in seeds:
        path = f"{prefix}_s{seed}.npz"
        run = artifacts.load_run(path, {"correct": (len(queries),)})  # a damaged run is deleted, then redone
        if run is None:
            if retrain is None:
                return None
            keep = np.setdiff1d(np.arange(n_train), removed)
            run = retrain(keep, int(seed), list(queries))
            artifacts.save_arrays(path, **run)
        correct.append(run["correct"])
    return np.mean(correct, axis=0)


def query_outcome(retrain, folder: str, ranking: np.ndarray, query: int, intervals: list, seeds,
                  n_train: int) -> list | None:
    """One query under one ranking: per k, the mean accuracy without the top k and whether it has flipped.

    Flipped from the first k whose accuracy is below 0.5 on; larger k count as flipped without training (accuracy
    None). Returns None when reading only (`retrain=None`) and a run is missing.
    """
    rows, flipped = [], False
    for k in intervals:
        accuracy = None
        if not flipped:
            accuracy = query_accuracy(retrain, os.path.join(folder, f"q{query}_k{k}"), ranking[:k], n_train, seeds,
                                      [query])
            if accuracy is None:
                return None
            accuracy = float(accuracy[0])
            flipped = accuracy < FLIP_BELOW
        rows.append({"query": query, "k": k, "accuracy": accuracy, "flipped": flipped})
    return rows


def run_experiment(args, rankings: dict, n_train: int, retrain) -> dict | None:
    """Base filter, this shard's queries, then every shard's outcomes -- or None while another shard still runs."""
    runs = os.path.join(results_dir(args), "runs")
    for method in rankings:
        os.makedirs(os.path.join(runs, method), exist_ok=True)
    candidates = list(range(len(rankings[RANDOM])))
    mine = sweeps.shard(candidates, args.shard_index, args.num_shards)

    # Every shard needs all base models; starting at a different one lets concurrent shards split the work.
    base_seeds = np.roll(args.seed + np.arange(args.num_base_repeat), -args.shard_index)
    base = query_accuracy(retrain, os.path.join(runs, "base"), [], n_train, base_seeds, candidates)
    queries = [q for q in candidates if base[q] == 1.0]
    if not queries:
        raise UserError(f"no query passes the base filter: none of the {len(candidates)} candidates is "
                        f"classified correctly by all {args.num_base_repeat} base models; train better "
                        "(e.g. --learning_rate, --num_train_epochs) or raise --max_query_examples")
    passing = set(queries)
    my_queries = [q for q in mine if q in passing]
    logger.info("%d of %d candidate queries pass the base filter; this shard tests %d of them", len(queries),
                len(candidates), len(my_queries))

    seeds = args.seed + np.arange(args.num_repeat)

    def outcome(method, query, train):
        return query_outcome(train, os.path.join(runs, method), rankings[method][query], query,
                             args.remove_intervals, seeds, n_train)

    # Queries outermost: an interrupted run has every method's outcome for the queries it finished.
    for query in tqdm(my_queries, desc="Queries"):
        for method in rankings:
            outcome(method, query, retrain)

    rows = []
    for method in rankings:
        for query in queries:
            found = outcome(method, query, None)
            if found is None:
                logger.info("Shard %d done; results are gathered when the last shard finishes (or rerun the command)",
                            args.shard_index)
                return None
            rows += [{"method": method, **row} for row in found]
    fractions = {method: [float(np.mean([r["flipped"] for r in rows if r["method"] == method and r["k"] == k]))
                          for k in args.remove_intervals] for method in rankings}
    return {"task": args.dataset_name, "num_train": n_train, "remove_intervals": args.remove_intervals,
            "num_base_repeat": args.num_base_repeat, "num_repeat": args.num_repeat, "num_candidates": len(candidates),
            "queries": queries, "base_accuracy": base.tolist(), "flip_fraction": fractions, "outcomes": rows}


# ----------------------------------------------------------------------------------------------------------------------
# Results

def write_csv(path: str, header: list, rows: list) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_results(results: dict, output_dir: str) -> str:
    """The JSON (everything), the per-query outcomes and the flip-fraction table as CSV; returns the JSON's path."""
    path = os.path.join(output_dir, RESULTS_JSON)
    artifacts.atomic_write_json(results, path)
    write_csv(os.path.join(output_dir, "counterfactual_outcomes.csv"), ["method", "query", "k", "accuracy", "flipped"],
              [[r["method"], r["query"], r["k"], "" if r["accuracy"] is None else r["accuracy"], int(r["flipped"])]
               for r in results["outcomes"]])
    methods = list(results["flip_fraction"])
    write_csv(os.path.join(output_dir, "counterfactual_flip_fraction.csv"), ["k", *methods],
              [[k, *(f"{results['flip_fraction'][m][i]:.4f}" for m in methods)]
               for i, k in enumerate(results["remove_intervals"])])
    return path


def plot(results_path: str, figure_path: str) -> None:
    """Fraction of queries flipped against k, one line per method, drawn from the results file alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(results_path):
        raise UserError(f"no results at {results_path}; run run_counterfactual.py (every shard) first")
    with open(results_path) as f:
        results = json.load(f)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, (method, fractions) in enumerate(results["flip_fraction"].items()):
        ax.plot(results["remove_intervals"], fractions, marker="os^vDP"[i % 6], label=method)  # markers: ties show
    ax.set_xticks(results["remove_intervals"])
    ax.set(xlabel="training examples removed (k)", ylabel="fraction of queries flipped", ylim=(-0.02, 1.02),
           title=f"{results['task']}: {len(results['queries'])} queries, {results['num_train']} training examples")
    ax.grid(alpha=0.3)
    ax.legend()
    artifacts.save_figure(fig, figure_path)
    logger.info("Figure written to %s", figure_path)


def main():
    args = parse_args()
    cli.setup_logging(args.verbose)
    cli.log_configuration(args)
    folder = results_dir(args)
    figure = args.figure or os.path.join(folder, "counterfactual.png")
    if args.plot_only:
        plot(os.path.join(folder, RESULTS_JSON), figure)
        return
    task = pipeline.get_task(args.dataset_name)
    if task.is_regression:
        raise UserError(f"the counterfactual test needs a classification task; '{args.dataset_name}' is "
                        "regression, with no prediction to flip")

    # Data: the training set analyze.py scored, and its first queries as candidates.
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir,
                                                             args.max_train_samples, args.max_query_examples,
                                                             args.label_noise, args.label_noise_seed)
    rankings = load_rankings(args, train_text, query_text["label"])
    check_intervals(args.remove_intervals, rankings, len(train_text), args.train_batch_size)
    arguments = {**{k: v for k, v in vars(args).items() if k not in NOT_RESULTS},
                 "rankings": rankings_fingerprint(rankings, args.remove_intervals[-1])}
    artifacts.claim_experiment(folder, arguments, keep_both="another --counterfactual_dir")

    logger.info("***** Running counterfactual retraining *****")
    logger.info("  Task = %s, train = %d, candidates = %d, rankings = %s, k = %s, results = %s", args.dataset_name,
                len(train_text), len(query_text), list(rankings), args.remove_intervals, folder)
    results = run_experiment(args, rankings, len(train_text), sweeps.retrainer(args, train_text, query_text))
    if results is None:
        return
    for i, k in enumerate(results["remove_intervals"]):
        logger.info("  k = %4d: %s", k, ", ".join(f"{m} {f[i]:.2f}" for m, f in results["flip_fraction"].items()))
    plot(write_results(results, folder), figure)


if __name__ == "__main__":
    cli.cli(main)
