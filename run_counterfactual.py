"""Counterfactual test of influence scores: remove a query's most influential training examples, retrain, and count
how often its prediction flips (the seed's RTE experiment, with a random baseline that draws training examples).

Candidates are the first --max_query_examples validation examples (the first queries analyze.py scored); only those that
every base model (--num_base_repeat seeds, full training set) classifies correctly are tested. For each such query and
each ranking of the training set -- a score set from analyze.py, most positive first, and the random baseline (random
training examples with the query's label) -- the top k are removed for each k in --remove_intervals and the model is
retrained with --num_repeat seeds (train.py's recipe and flags). The query is flipped at the smallest k where its mean
accuracy drops below 0.5; larger k then count as flipped without training (the seed's early stop). --search bisect
finds that k with fewer retrains.

    python train.py --dataset_name rte
    python analyze.py --dataset_name rte --factor_strategy ekfac
    python analyze.py --dataset_name rte --factor_strategy identity
    python run_counterfactual.py --dataset_name rte --strategies ekfac identity

The data, model and recipe are the checkpoint's (--checkpoint_dir, as train.py wrote it); the scores are analyze.py's
in --output_dir. Offline, at CPU scale, after the README's quick start (train.py, then analyze.py with ekfac and
with identity):

    python run_counterfactual.py --dataset_name sst2 --max_query_examples 8 --num_base_repeat 2 --num_repeat 1 \
        --remove_intervals 25 50 100

Results go to <output_dir>/<dataset_name>/counterfactual_<hash of the arguments>/ (or --counterfactual_dir). Every
retrain is saved there as it ends (runs/), so rerunning the command redoes nothing finished. Shard the queries over
processes with --shard_index/--num_shards or torchrun (each process takes cuda:LOCAL_RANK):

    torchrun --nproc_per_node 8 run_counterfactual.py --dataset_name rte --strategies ekfac identity

The process that finishes last gathers every shard's runs into counterfactual_results.json,
counterfactual_outcomes.csv (per query and k) and counterfactual_flip_fraction.csv, and draws --figure (default:
counterfactual.png beside them) from the JSON; `--plot_only` redraws the figure from the JSON alone.
"""
import logging
import os

from glue_attribution import checkpoints, cli, pipeline
from glue_attribution.config import CounterfactualConfig

logger = logging.getLogger("run_counterfactual")


def parse_args(argv=None):
    parser = cli.parser("Counterfactual evaluation of influence scores on a GLUE task.")
    cli.add_data_args(parser, checkpoint=True)
    cli.add_training_args(parser, checkpoint=True)
    cli.add_shard_args(parser)
    analysis, output = cli.group(parser, cli.ANALYSIS), cli.group(parser, cli.OUTPUT)
    analysis.add_argument("--strategies", nargs="+", default=["ekfac", "identity"],
                          help="Score sets written by analyze.py (e.g. ekfac identity kfac diagonal ekfac_half); "
                               "the random baseline always runs as well.")
    output.add_argument("--output_dir", default="./influence_results",
                        help="Results root: analyze.py's scores, and these results in <output_dir>/<dataset_name>/.")
    output.add_argument("--counterfactual_dir", default=None,
                        help="Results folder (default: <output_dir>/<dataset_name>/counterfactual_<hash of the "
                             "arguments>).")
    analysis.add_argument("--max_query_examples", type=cli.positive_int, default=100,
                          help="Candidate queries: the first N validation examples.")
    analysis.add_argument("--remove_intervals", type=cli.positive_int, nargs="+", default=[20, 40, 60, 80, 100, 120],
                          help="How many top-ranked training examples to remove (k).")
    analysis.add_argument("--num_base_repeat", type=cli.positive_int, default=5,
                          help="Base models on the full training set; a query is tested only if all get it right.")
    analysis.add_argument("--num_repeat", type=cli.positive_int, default=3,
                          help="Retrains (seeds) per query, method and k.")
    analysis.add_argument("--search", choices=["ascending", "bisect"], default="ascending",
                          help="How to find the smallest k that flips a query: train every k from the smallest until "
                               "one flips (the seed), or bisect the k values (2 retrains instead of up to 3 for three "
                               "k, 3 instead of up to 6 for the seed's six). Both assume, as the seed's early stop "
                               "does, that removing more examples does not undo a flip.")
    analysis.add_argument("--reference", default=None,
                          help="The ranking every other is compared with, paired (default: the first score set of "
                               "--strategies; 'random' for the baseline). Retrains nothing: rerun a finished command "
                               "with another to recompute the differences.")
    analysis.add_argument("--seed", type=int, default=1004,
                          help="Retrain i uses seed + i (base models and removals alike); also seeds the baseline.")
    output.add_argument("--figure", default=None, help="Where the figure goes (default: beside the results).")
    output.add_argument("--plot_only", action="store_true",
                        help="Redraw --figure from the results folder's counterfactual_results.json and exit.")
    args = parser.parse_args(argv)
    args.remove_intervals = sorted(set(args.remove_intervals))
    return CounterfactualConfig.from_flags(vars(cli.from_checkpoint(args, args.checkpoint_dir, recipe=True)))


def main():
    config = parse_args()
    from glue_attribution import counterfactual, plots, progress, results, sweeps

    cli.setup_logging(config.verbose)
    cli.log_configuration(config)
    folder = counterfactual.results_dir(config)
    figure = config.figure or os.path.join(folder, "counterfactual.png")
    if config.plot_only:
        progress.stage("drawing the counterfactual figure", os.path.dirname(os.path.abspath(figure)))
        plots.flip_fractions(counterfactual.read_results(folder), figure)
        return
    if pipeline.get_task(config.dataset_name).is_regression:
        raise cli.GlueError(f"the counterfactual test needs a classification task; '{config.dataset_name}' is "
                            "regression, with no prediction to flip")

    # Data: the training set analyze.py scored, and its first queries as candidates.
    train_text, query_text = pipeline.load_train_and_queries(config.dataset_name, config.data_dir,
                                                             config.max_train_samples, config.max_query_examples,
                                                             config.label_noise, config.label_noise_seed)
    checkpoints.check_checkpoint_data(config, train_text)
    rankings, used = counterfactual.load_rankings(config, train_text, query_text["label"])
    counterfactual.check_intervals(config.remove_intervals, rankings, len(train_text), config.train_batch_size)
    counterfactual.reference_ranking(config.reference, rankings)  # a wrong --reference fails before any retrain
    results.claim_experiment(folder, counterfactual.experiment_arguments(config, rankings),
                             keep_both="another --counterfactual_dir")

    logger.info("***** Running counterfactual retraining *****")
    logger.info("  Task = %s, train = %d, candidates = %d, rankings = %s, k = %s, results = %s",
                config.dataset_name, len(train_text), len(query_text), list(rankings), config.remove_intervals, folder)
    outcomes = counterfactual.run_experiment(config, rankings, len(train_text),
                                             sweeps.retrainer(config, train_text, query_text))
    if outcomes is None:  # another shard is still running
        return
    for i, k in enumerate(outcomes["remove_intervals"]):  # flip fraction [95% CI over queries]
        logger.info("  k = %4d: %s", k, ", ".join(f"{m} {f[i]:.2f} [{outcomes['flip_fraction_ci95'][m][i][0]:.2f}, "
                                                  f"{outcomes['flip_fraction_ci95'][m][i][1]:.2f}]"
                                                  for m, f in outcomes["flip_fraction"].items()))
    counterfactual.write_outcomes({**outcomes, "scores": used}, folder)
    progress.stage("drawing the counterfactual figure", os.path.dirname(os.path.abspath(figure)))
    plots.flip_fractions(outcomes, figure)
    logger.info("Results in %s, figure: %s", folder, figure)


if __name__ == "__main__":
    cli.run(main)
