"""Fit influence factors and compute pairwise influence scores (validation queries x training examples).

    python analyze.py --dataset_name sst2 --query_batch_size 175 --train_batch_size 128 \
        --checkpoint_dir ./checkpoints --factor_strategy ekfac [--use_half_precision]

The data, model and truncation are the checkpoint's (train.py's flags); a flag given here overrides them, with a
warning, and is recorded. Factors go to `<output_dir>/<dataset_name>/factors_<strategy>[_half]/`, scores to
`<output_dir>/<dataset_name>/scores_<strategy>[_half][_qlrR]/pairwise_scores.safetensors` (kronfluence's layout), with
`glue_scores.json` beside them. Row i / column j of the scores are query i / training example j in dataset order.
Rerunning the same command reuses finished factors and scores; a killed run resumes after its last finished stage.
`--checkpoint_epoch E` analyses the weights after epoch E instead (train.py --save_epoch_checkpoints), as
`<name>_epoch<E>`: self-influence along training for detect_mislabeled.py.

An ensemble (`train.py --seed 0 1 2 3 --checkpoint_dir runs/ensemble`) is analysed member by member, each published
as `<name>_seed<S>`, then combined into `<name>_ens<N>` (the mean of per-query standardised scores,
glue_attribution/ensembles.py). `--factor_strategy trak` computes TRAK with traker instead
(glue_attribution/trak_scores.py; `--proj_dim`), in the same layout.
"""

import importlib.util
import logging
import os
import re

from glue_attribution import cli
from glue_attribution.config import AnalysisConfig

logger = logging.getLogger("analyze")

# trak: TRAK via traker, the peer method; *_index: a gradient index (glue_attribution/gradient_index.py)
STRATEGIES = ["identity", "diagonal", "kfac", "ekfac", "trak", "ekfac_index", "kfac_index"]


def damping(value: str):
    return None if value == "auto" else float(value)


def index_rank(value: str):
    return None if value == "full" else cli.positive_int(value)


def parse_args(argv=None):
    parser = cli.parser("Influence analysis on a GLUE task.")
    cli.add_data_args(parser, checkpoint=True)
    data, analysis, output = cli.group(parser, cli.DATA), cli.group(parser, cli.ANALYSIS), cli.group(parser, cli.OUTPUT)
    data.add_argument("--ensemble_seeds", type=int, nargs="+", default=None,
                      help="With an ensemble in --checkpoint_dir (train.py --seed A B ...): only these members "
                           "(default: all).")
    data.add_argument("--checkpoint_epoch", type=cli.positive_int, default=None,
                      help="Analyse the weights after this epoch (train.py --save_epoch_checkpoints); the scores "
                           "are named <name>_epoch<E>.")
    output.add_argument("--output_dir", default="./influence_results", help="Root of factors and scores.")
    analysis.add_argument("--factor_strategy", default="ekfac", help=f"One of {STRATEGIES}.")
    analysis.add_argument("--use_half_precision", action="store_true",
                          help="bfloat16 factors and scores (kronfluence's all-low-precision arguments).")
    analysis.add_argument("--query_gradient_rank", type=cli.positive_int, default=None,
                          help="Low-rank approximation of query gradients (names the scores <strategy>_qlrR).")
    analysis.add_argument("--damping_factor", type=damping, default=1e-8,
                          help="Damping for the inverse Hessian ('auto': 0.1 x mean eigenvalue); the seed's default.")
    output.add_argument("--scores_name", default=None,
                        help="Name the scores (default: <strategy>[_half][_qlrR], as the seed); e.g. for a damping "
                             "ablation that reuses the factors.")
    analysis.add_argument("--proj_dim", type=cli.positive_int, default=None,
                          help="trak: dimension of the random projection of the per-example gradients (default: half "
                               "the training examples, at most 2048: TRAK inverts the Gram matrix of the projected "
                               "training gradients, singular from proj_dim = examples on).")
    analysis.add_argument("--query_batch_size", type=cli.positive_int, default=8, help="Queries per batch.")
    analysis.add_argument("--train_batch_size", type=cli.positive_int, default=8,
                          help="Training examples per scoring batch.")
    analysis.add_argument("--factor_batch_size", type=cli.positive_int, default=None,
                          help="Examples per batch when fitting factors (default: kronfluence's search on one GPU; "
                               "--train_batch_size on CPU, where the search can exhaust memory, and under torchrun, "
                               "where kronfluence cannot search).")
    data.add_argument("--max_query_examples", type=cli.positive_int, default=2000,
                      help="Use the first min(len(validation), N) validation examples as queries.")
    analysis.add_argument("--tracked_modules", nargs="+", default=None,
                          help="Only nn.Linear modules whose names match these glob patterns (default: all).")
    analysis.add_argument("--compute_self_scores", action="store_true",
                          help="Also compute self-influence of every training example (finds mislabeled data).")
    analysis.add_argument("--stock_kronfluence", action="store_true",
                          help="Use kronfluence's own Lambda/self-score trackers instead of the token-factored ones.")
    analysis.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on GPU (faster, ~1e-3 relative).")
    analysis.add_argument("--use_empirical_fisher", action="store_true",
                          help="Fit factors with the dataset labels instead of labels sampled from the model.")
    analysis.add_argument("--seed", type=int, default=0,
                          help="Seeds the labels sampled for the true Fisher (trak: the projection).")
    analysis.add_argument("--float64", action="store_true",
                          help="Model, factors and scores in float64 (exactness checks).")
    data.add_argument("--attn_implementation", default=None, help="e.g. 'eager' (default: the model's).")
    output.add_argument("--overwrite", action="store_true", help="Recompute factors and scores even if present.")
    output.add_argument("--profile", action="store_true", help="Print kronfluence's profiler table.")
    output.add_argument("--inspect_query", type=int, default=None,
                        help="Print this query, the model's prediction and margin on it, its most positively and "
                             "negatively influential training examples, and the explorer's address opened on it.")
    output.add_argument("--top_k", type=cli.positive_int, default=3,
                        help="How many examples --inspect_query prints per side.")
    output.add_argument("--inspect_self", type=cli.positive_int, default=None,
                        help="With --compute_self_scores: print the K training examples of highest self-influence "
                             "(the whole ranking is in self_influence_ranking.csv beside the scores).")
    output.add_argument("--html", default=None,
                        help="With --inspect_query: write a page of the top examples with each word coloured by its "
                             "per-token influence (and the numbers as JSON beside it).")
    output.add_argument("--explorer_tokens", type=cli.positive_int, default=None, metavar="N",
                        help="Shade the words of the top --top_k examples per side of the first N queries on the "
                             "explorer page by their per-token influence (one kronfluence pass per query).")
    index = cli.group(parser, "gradient index (--factor_strategy ekfac_index / kfac_index)")
    index.add_argument("--index_rank", type=index_rank, default=16, metavar="K",
                       help="Eigenvectors (or random directions) kept per side of each module: k x k numbers per "
                            "module and example; 'full' keeps all (exact EK-FAC / K-FAC).")
    index.add_argument("--index_projection", choices=["eigen", "random"], default="eigen",
                       help="Project on the top-k eigenvectors of K-FAC factors, or at random.")
    index.add_argument("--index_factor_examples", type=cli.positive_int, default=None, metavar="N",
                       help="Eigen projection: fit the K-FAC factors on the first N training examples (default: "
                            "all).")
    index.add_argument("--index_normalize", action="store_true",
                       help="Divide each training example's scores by the square root of its self-influence "
                            "(unit-normalised, as TrackStar and RelatIF); names the scores <name>_cos.")
    index.add_argument("--index_store_dtype", choices=["float32", "float16"], default="float32",
                       help="Precision of the stored gradients (float16 halves disk and memory).")
    index.add_argument("--index_chunk_size", type=cli.positive_int, default=2048, metavar="N",
                       help="Training examples per chunk, the unit of resuming and of sharding.")
    index.add_argument("--query_text", nargs="+", default=None, metavar="TEXT",
                       help="A new query (one text, two for pair tasks): print and write its most influential "
                            "training examples from the existing index.")
    index.add_argument("--query_file", default=None,
                       help="New queries from a CSV/TSV/JSON-lines file with the task's text columns (label "
                            "optional: the model's prediction otherwise).")
    index.add_argument("--query_label", default=None,
                       help="With --query_text: its label (name or id; default: the model's prediction).")
    cli.add_shard_args(parser)  # in the output group: chunks of the index per process
    args = parser.parse_args(argv)
    if args.factor_strategy not in STRATEGIES:
        parser.error(f"unknown --factor_strategy '{args.factor_strategy}'; choose one of {', '.join(STRATEGIES)}")
    if args.factor_strategy == "trak" and (args.use_half_precision or args.query_gradient_rank or args.html
                                           or args.compute_self_scores or args.float64 or args.explorer_tokens):
        parser.error("--factor_strategy trak takes none of --use_half_precision, --query_gradient_rank, --html, "
                     "--compute_self_scores, --float64, --explorer_tokens")
    if args.factor_strategy == "trak" and importlib.util.find_spec("trak") is None:
        parser.error("--factor_strategy trak needs traker: pip install traker==0.3.2")
    if args.factor_strategy.endswith("_index") and (args.use_half_precision or args.query_gradient_rank or args.html
                                                     or args.explorer_tokens):
        parser.error(f"--factor_strategy {args.factor_strategy} takes none of --use_half_precision (see "
                     "--index_store_dtype), --query_gradient_rank, --html, --explorer_tokens")
    if args.query_text and args.query_file:
        parser.error("pass --query_text or --query_file, not both")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index {args.shard_index} is not in [0, --num_shards {args.num_shards})")
    if args.scores_name and re.fullmatch(r".+_(seed-?\d+|ens\d+|epoch\d+)", args.scores_name):
        parser.error(f"--scores_name {args.scores_name}: names ending in _seed<S>, _ens<N> or _epoch<E> are the "
                     "ones analyze.py gives to ensembles and epochs; choose another")
    if args.html is not None and args.inspect_query is None:
        parser.error("--html draws the query of --inspect_query; pass both")
    if args.inspect_self is not None and not args.compute_self_scores:
        parser.error("--inspect_self ranks self-influence scores; pass --compute_self_scores too")
    args = cli.from_checkpoint(args, args.checkpoint_dir)
    if "model_name_or_path" in args.overrides:
        parser.error("--model_name_or_path: analyze.py analyses the model in --checkpoint_dir; pass it to train.py")
    return AnalysisConfig.from_flags(vars(args))  # the analysis's configuration


def main():
    config = parse_args()
    from glue_attribution import analysis, explorer, influence, report, scores

    cli.setup_logging(config.verbose)
    cli.log_configuration(config)
    if config.query_text or config.query_file:  # new texts against an existing gradient index
        path = analysis.answer_new_queries(config)
        logger.info("Top influential training examples of the new queries: %s", path)
        return
    done = analysis.analyze(config)
    if done is None:  # another torchrun process (the main one writes the results), or a shard of an index
        return
    config, scores_name, members, names, train_text, query_text = done

    pairwise, _ = scores.load_scores(config.output_dir, config.dataset_name, scores_name)
    folder = scores.scores_dir(config.output_dir, config.dataset_name, scores_name)
    logger.info("Scores %s (%d queries x %d training examples, dataset order): %s", scores_name, *pairwise.shape,
                os.path.join(folder, "pairwise_scores.safetensors"))
    member_scores = ([scores.load_scores(config.output_dir, config.dataset_name, name)[0] for name in names]
                     if members[0][0] is not None else None)
    tokens = (influence.explorer_tokens(config, members[0][1], pairwise, train_text, query_text)
              if config.explorer_tokens else None)
    page = explorer.explore_scores(config, members[0][1], pairwise, scores_name, query_text, train_text, folder,
                                   members=member_scores, tokens=tokens)
    logger.info("Explorer (open it in a browser): %s", page)
    if config.compute_self_scores:
        logger.info("Training examples by self-influence (candidates for wrong labels first): %s",
                    os.path.join(folder, scores.SELF_RANKING))
        if config.inspect_self is not None:
            report.show_self_ranking(os.path.join(folder, scores.SELF_RANKING), config.inspect_self, scores_name)
    if config.inspect_query is not None:
        report.show_influences(pairwise, config.inspect_query, query_text, train_text, config.dataset_name,
                               config.top_k, scores_name, explorer.read_data(page)["queries"][config.inspect_query])
        print(f"\nThis query in the explorer: {explorer.address(page, query=config.inspect_query)}")
    if config.html is not None:
        influence.token_report(config, members[0][1], pairwise, scores_name, query_text, train_text)


if __name__ == "__main__":
    cli.run(main)
