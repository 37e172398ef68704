"""Fit influence factors and compute pairwise influence scores (validation queries x training examples).

    python analyze.py --dataset_name sst2 --query_batch_size 175 --train_batch_size 128 \
        --checkpoint_dir ./checkpoints --factor_strategy ekfac [--use_half_precision]

The data, model and truncation are the checkpoint's (train.py's flags); a flag given here overrides them, with a
warning, and is recorded. Factors go to `<output_dir>/<dataset_name>/factors_<strategy>[_half]/`, scores to
`<output_dir>/<dataset_name>/scores_<strategy>[_half][_qlrR]/pairwise_scores.safetensors` (kronfluence's layout), with
`glue_scores.json` beside them. Row i / column j of the scores are query i / training example j in dataset order.
Rerunning the same command reuses finished factors and scores; a killed run resumes after its last finished stage.

An ensemble (`train.py --seed 0 1 2 3 --checkpoint_dir runs/ensemble`) is analysed member by member, each published
as `<name>_seed<S>`, then combined into `<name>_ens<N>` (ensembles.py: the mean of per-query standardised scores).
`--factor_strategy trak` computes TRAK with traker instead (trak_scores.py; `--proj_dim`), in the same layout.
"""

import importlib.util

import cli

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac", "trak"]  # trak: TRAK via traker, the peer method


def damping(value: str):
    return None if value == "auto" else float(value)


def parse_args(argv=None):
    parser = cli.parser("Influence analysis on a GLUE task.")
    cli.add_data_args(parser, checkpoint=True)
    parser.add_argument("--ensemble_seeds", type=int, nargs="+", default=None,
                        help="With an ensemble in --checkpoint_dir (train.py --seed A B ...): only these members "
                             "(default: all).")
    parser.add_argument("--output_dir", default="./influence_results", help="Root of factors and scores.")
    parser.add_argument("--factor_strategy", default="ekfac", help=f"One of {STRATEGIES}.")
    parser.add_argument("--use_half_precision", action="store_true",
                        help="bfloat16 factors and scores (kronfluence's all-low-precision arguments).")
    parser.add_argument("--query_gradient_rank", type=cli.positive_int, default=None,
                        help="Low-rank approximation of query gradients (names the scores <strategy>_qlrR).")
    parser.add_argument("--damping_factor", type=damping, default=1e-8,
                        help="Damping for the inverse Hessian ('auto': 0.1 x mean eigenvalue); the seed's default.")
    parser.add_argument("--scores_name", default=None,
                        help="Name the scores (default: <strategy>[_half][_qlrR], as the seed); e.g. for a damping "
                             "ablation that reuses the factors.")
    parser.add_argument("--proj_dim", type=cli.positive_int, default=None,
                        help="trak: dimension of the random projection of the per-example gradients (default: half "
                             "the training examples, at most 2048: TRAK inverts the Gram matrix of the projected "
                             "training gradients, singular from proj_dim = examples on).")
    parser.add_argument("--query_batch_size", type=cli.positive_int, default=8, help="Queries per batch.")
    parser.add_argument("--train_batch_size", type=cli.positive_int, default=8,
                        help="Training examples per scoring batch.")
    parser.add_argument("--factor_batch_size", type=cli.positive_int, default=None,
                        help="Examples per batch when fitting factors (default: kronfluence's search on one GPU; "
                             "--train_batch_size on CPU, where the search can exhaust memory, and under torchrun, "
                             "where kronfluence cannot search).")
    parser.add_argument("--max_query_examples", type=cli.positive_int, default=2000,
                        help="Use the first min(len(validation), N) validation examples as queries.")
    parser.add_argument("--tracked_modules", nargs="+", default=None,
                        help="Only nn.Linear modules whose names match these glob patterns (default: all).")
    parser.add_argument("--compute_self_scores", action="store_true",
                        help="Also compute self-influence of every training example (finds mislabeled data).")
    parser.add_argument("--stock_kronfluence", action="store_true",
                        help="Use kronfluence's own Lambda/self-score trackers instead of the token-factored ones.")
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on GPU (faster, ~1e-3 relative).")
    parser.add_argument("--use_empirical_fisher", action="store_true",
                        help="Fit factors with the dataset labels instead of labels sampled from the model.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds the labels sampled for the true Fisher (trak: the projection).")
    parser.add_argument("--float64", action="store_true",
                        help="Model, factors and scores in float64 (exactness checks).")
    parser.add_argument("--attn_implementation", default=None, help="e.g. 'eager' (default: the model's).")
    parser.add_argument("--overwrite", action="store_true", help="Recompute factors and scores even if present.")
    parser.add_argument("--profile", action="store_true", help="Print kronfluence's profiler table.")
    parser.add_argument("--inspect_query", "--query_index", type=int, default=None,
                        help="Print this query and its most positively and negatively influential training examples.")
    parser.add_argument("--top_k", type=cli.positive_int, default=3,
                        help="How many examples --inspect_query prints per side.")
    parser.add_argument("--inspect_self", type=cli.positive_int, default=None,
                        help="With --compute_self_scores: print the K training examples of highest self-influence "
                             "(the whole ranking is in self_influence_ranking.csv beside the scores).")
    parser.add_argument("--html", default=None,
                        help="With --inspect_query: write a page of the top examples with each word coloured by its "
                             "per-token influence (and the numbers as JSON beside it).")
    args = parser.parse_args(argv)
    if args.factor_strategy not in STRATEGIES:
        parser.error(f"unknown --factor_strategy '{args.factor_strategy}'; choose one of {', '.join(STRATEGIES)}")
    if args.factor_strategy == "trak" and (args.use_half_precision or args.query_gradient_rank or args.html
                                           or args.compute_self_scores or args.float64):
        parser.error("--factor_strategy trak takes none of --use_half_precision, --query_gradient_rank, --html, "
                     "--compute_self_scores, --float64")
    if args.factor_strategy == "trak" and importlib.util.find_spec("trak") is None:
        parser.error("--factor_strategy trak needs traker: pip install traker==0.3.2")
    if args.html is not None and args.inspect_query is None:
        parser.error("--html draws the query of --inspect_query; pass both")
    if args.inspect_self is not None and not args.compute_self_scores:
        parser.error("--inspect_self ranks self-influence scores; pass --compute_self_scores too")
    args = cli.from_checkpoint(args, args.checkpoint_dir)
    if "model_name_or_path" in args.overrides:
        parser.error("--model_name_or_path: analyze.py analyses the model in --checkpoint_dir; pass it to train.py")
    return args


if __name__ == "__main__":
    cli.cli(parse_args)  # --help and argument errors answer here, before the heavy imports below

import copy  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import importlib.metadata  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments  # noqa: E402
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import artifacts  # noqa: E402
import ensembles  # noqa: E402
import fast_factors  # noqa: E402
import pipeline  # noqa: E402
import report  # noqa: E402
from cli import UserError  # noqa: E402
from task import GlueTask  # noqa: E402

logger = logging.getLogger("analyze")
FACTORS_META = "glue_factors.json"
SELF_RANKING = "self_influence_ranking.csv"


def influence_arguments(args) -> tuple:
    """(factors_name, factor_args, scores_name, score_args), named as the seed names them."""
    if args.factor_strategy == "trak":  # no factors: TRAK's curvature is its projected features' Gram matrix
        return None, None, args.scores_name or "trak", None
    if args.use_half_precision:
        factor_args = all_low_precision_factor_arguments(strategy=args.factor_strategy, dtype=torch.bfloat16)
        score_args = all_low_precision_score_arguments(damping_factor=args.damping_factor, dtype=torch.bfloat16)
    else:
        factor_args = FactorArguments(strategy=args.factor_strategy)
        score_args = ScoreArguments(damping_factor=args.damping_factor)
    factor_args.use_empirical_fisher = args.use_empirical_fisher
    if args.float64:
        for name in ("activation_covariance_dtype", "gradient_covariance_dtype", "eigendecomposition_dtype",
                     "lambda_dtype", "per_sample_gradient_dtype"):
            setattr(factor_args, name, torch.float64)
        for name in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype", "query_gradient_svd_dtype"):
            setattr(score_args, name, torch.float64)
    factors_name = args.factor_strategy + ("_half" if args.use_half_precision else "")
    scores_name = factors_name
    if args.query_gradient_rank is not None:
        score_args.query_gradient_low_rank = args.query_gradient_rank
        score_args.query_gradient_accumulation_steps = 10  # as kronfluence's default_score_arguments
        scores_name += f"_qlr{args.query_gradient_rank}"
    return factors_name, factor_args, args.scores_name or scores_name, score_args


def tracked_modules(model: nn.Module, patterns) -> list:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if patterns is None:
        return None
    chosen = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
    if not chosen:
        raise UserError(f"--tracked_modules {' '.join(patterns)} matches no nn.Linear module "
                        f"(e.g. {names[0]}, {names[-1]})")
    return chosen


FACTOR_STAGES = ("covariance", "eigendecomposition", "lambda")


def on_main(fn, *args, **kwargs):
    """Runs a decision or write on disk in the main process only and hands its result to every rank: under torchrun
    all ranks compute, one writes."""
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    result = [fn(*args, **kwargs) if main else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def fit_factors(analyzer_at, public: str, signature: dict, factors_name: str, factor_args, train_dataset,
                batch_size: int | None, seed: int, overwrite: bool) -> dict:
    """Reuses the published factors for `signature`, or fits them in their private folder, resuming after the last
    stage whose files verify, and publishes them. Each stage is seeded (the true Fisher samples labels), so a
    resumed fit equals an uninterrupted one."""
    meta = on_main(artifacts.reuse, public, FACTORS_META, "factors", signature, overwrite)
    if meta is not None:
        logger.info("Reusing factors %s", public)
        return meta
    root = artifacts.staging_dir(public, signature)
    work = os.path.join(root, f"factors_{factors_name}")

    def resumable_stages():
        if overwrite:
            shutil.rmtree(root, ignore_errors=True)
        else:
            artifacts.salvage_stages(public, FACTORS_META, signature, root, work, list(FACTOR_STAGES))
        return artifacts.finished_stages(root, work, list(FACTOR_STAGES))

    done = on_main(resumable_stages)
    if done:
        logger.info("Resuming factors after the %s stage(s) in %s", ", ".join(done), root)
    analyzer = analyzer_at(root)
    fit = {"factors_name": factors_name, "factor_args": factor_args, "overwrite_output_dir": False}
    data = {"dataset": train_dataset, "per_device_batch_size": batch_size}
    stages = {"covariance": lambda: analyzer.fit_covariance_matrices(**fit, **data),
              "eigendecomposition": lambda: analyzer.perform_eigendecomposition(**fit),
              "lambda": lambda: analyzer.fit_lambda_matrices(**fit, **data)}
    timings = {}
    for i, (stage, run) in enumerate(stages.items()):
        if stage in done:
            continue
        artifacts.kill_point(f"before_{stage}")
        transformers.set_seed(seed + i)
        before, start = artifacts.files_in(work), time.time()
        run()
        timings[f"{stage}_seconds"] = time.time() - start
        on_main(artifacts.record_stage, root, work, stage, before)
        artifacts.kill_point(f"after_{stage}")

    def publish():
        published = artifacts.publish(work, public, FACTORS_META, {
            "signature": signature, "stages": artifacts.stage_files(root, list(FACTOR_STAGES)), **timings})
        artifacts.clean_staging(public)
        return published

    return on_main(publish)


def compute_scores(analyzer, root: str, public: str, args, names: tuple, score_args, datasets: tuple,
                   orders: tuple, meta: dict, train_text) -> dict:
    """Pairwise (and self) scores in the private folder `root`, where the factors are already linked; mapped back
    to dataset order there (with the self-influence ranking beside them), then published. Always from scratch: one
    stage, nothing to resume."""
    factors_name, scores_name = names
    query_dataset, train_dataset = datasets
    train_order, query_order = orders
    start = time.time()
    analyzer.compute_pairwise_scores(
        scores_name=scores_name, factors_name=factors_name, query_dataset=query_dataset,
        train_dataset=train_dataset, per_device_query_batch_size=args.query_batch_size,
        per_device_train_batch_size=args.train_batch_size, score_args=score_args, overwrite_output_dir=True)
    if args.compute_self_scores:
        analyzer.compute_self_scores(scores_name=scores_name, factors_name=factors_name, train_dataset=train_dataset,
                                     score_args=score_args, per_device_train_batch_size=args.train_batch_size,
                                     overwrite_output_dir=True)
    meta["scores_seconds"] = time.time() - start
    artifacts.kill_point("scores_saved")
    work = os.path.join(root, f"scores_{scores_name}")

    def publish():
        if train_order is not None:
            reorder_scores(os.path.join(work, "pairwise_scores.safetensors"), train_order, query_order)
            if args.compute_self_scores:
                reorder_scores(os.path.join(work, "self_scores.safetensors"), train_order)
        if args.compute_self_scores:
            self_scores = load_file(os.path.join(work, "self_scores.safetensors"))["all_modules"].float().numpy()
            write_self_ranking(os.path.join(work, SELF_RANKING), self_scores, train_text, args.dataset_name)
        published = artifacts.publish(work, public, artifacts.SCORES_META, meta)
        shutil.rmtree(root, ignore_errors=True)
        artifacts.clean_staging(public)
        return published

    return on_main(publish)


def write_self_ranking(path: str, self_scores: np.ndarray, train_text, task_name: str) -> None:
    """Every training example, highest self-influence first (an example the model could only fit by memorising it:
    the candidates for a wrong label), with its label and text: what a researcher reads to clean the data."""
    task = pipeline.get_task(task_name)
    with artifacts.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", "self_influence", "label", *task.keys])
        for rank, index in enumerate(np.argsort(-self_scores, kind="stable").tolist()):
            example = train_text[index]
            label = example["label"] if task.is_regression else task.labels[example["label"]]
            writer.writerow([rank + 1, index, f"{self_scores[index]:.6g}", label, *(example[k] for k in task.keys)])


def top_examples(row: np.ndarray, k: int) -> list:
    """The k most positively, then the k most negatively influential training examples (no index twice)."""
    order = np.argsort(-row, kind="stable")
    return list(dict.fromkeys([*order[:k].tolist(), *order[::-1][:k].tolist()]))


def token_scores(args, model, tokenizer, factors_public: str, factors_name: str, score_args, query,
                 train) -> np.ndarray:
    """Per-token influence of each training example in `train` on the one query: (examples, tokens), in `train`'s
    order, zero past each example's length. Computed by kronfluence (per-token and per-module scores, in one batch)
    for these few examples only: for the whole training set it would be queries x examples x tokens. Modules whose
    input has no token axis (the pooler, the classifier) act on the [CLS] state, so their scores go to [CLS]; so an
    example's per-token scores sum to its pairwise score."""
    analyzer_at, (query_dataset, train_dataset), (train_order, _) = prepare(args, model, tokenizer, train, query)
    staging = os.path.join(os.path.dirname(factors_public), artifacts.STAGING)
    root = tempfile.mkdtemp(prefix=f"tokens-{os.getpid()}-", dir=staging)
    try:
        with artifacts.lock(factors_public):
            artifacts.read(factors_public, FACTORS_META, "factors")
            artifacts.link_tree(factors_public, os.path.join(root, f"factors_{factors_name}"))
        token_args = copy.deepcopy(score_args)
        token_args.compute_per_token_scores = token_args.compute_per_module_scores = True
        analyzer = analyzer_at(root)
        analyzer.compute_pairwise_scores(
            scores_name="tokens", factors_name=factors_name, query_dataset=query_dataset, train_dataset=train_dataset,
            per_device_query_batch_size=1, per_device_train_batch_size=len(train_dataset), score_args=token_args,
            overwrite_output_dir=True)
        per_module = [s[0].double() for s in analyzer.load_pairwise_scores("tokens").values()]  # (examples, ...)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tokens = sum(s for s in per_module if s.dim() == 2)
    tokens[:, 0] += sum((s for s in per_module if s.dim() == 1), torch.zeros(len(tokens), dtype=tokens.dtype))
    if train_order is not None:
        tokens = tokens[torch.from_numpy(np.argsort(train_order))]
    return tokens.numpy()


def write_token_report(args, tokenizer, scores: np.ndarray, picks: list, tokens: np.ndarray, query_text, train_text,
                       scores_name: str) -> None:
    """--html: the page (report.py) and, beside it, the same numbers as JSON (per token and per word)."""
    task = pipeline.get_task(args.dataset_name)
    label = (lambda y: y) if task.is_regression else (lambda y: task.labels[y])
    query = query_text[args.inspect_query]
    examples = []
    for rank, (index, row) in enumerate(zip(picks, tokens)):
        example = train_text[index]
        texts = [example[key] for key in task.keys]
        encoding = tokenizer(*texts, truncation=True, max_length=args.max_seq_length, return_offsets_mapping=True)
        examples.append({
            "title": f"{'most positive' if scores[args.inspect_query, index] >= 0 else 'most negative'} #{rank + 1}",
            "index": index, "label": label(example["label"]), "score": float(scores[args.inspect_query, index]),
            "tokens": encoding.tokens(), "token_scores": row[:len(encoding.tokens())].tolist(),
            "words": report.words(encoding, texts, row)})
    title = (f"{args.dataset_name}: which words of the top training examples drive query {args.inspect_query} "
             f"({scores_name})")
    query_view = {"index": args.inspect_query, "label": label(query["label"]), "texts": [query[k] for k in task.keys]}
    artifacts.make_output_dir(os.path.dirname(os.path.abspath(args.html)))
    with artifacts.atomic_path(args.html) as tmp, open(tmp, "w") as f:
        f.write(report.page(title, query_view, examples))
    artifacts.atomic_write_json({"query": query_view, "scores_name": scores_name, "examples": examples},
                                os.path.splitext(args.html)[0] + ".json")
    logger.info("Token-level report: %s (numbers: %s)", args.html, os.path.splitext(args.html)[0] + ".json")


def reorder_scores(path: str, train_order: np.ndarray, query_order: np.ndarray | None = None) -> None:
    """Rewrites kronfluence's scores, computed on length-sorted data, in dataset order (in the private folder)."""
    tensors = {name: pipeline.to_dataset_order(scores, train_order, query_order)
               for name, scores in load_file(path).items()}
    with artifacts.atomic_path(path) as tmp:
        save_file(tensors, tmp)


def sorted_splits(args, tokenizer, train_text, query_text) -> tuple:
    """((train, query) tokenized, (train_order, query_order)): sorted by length for dynamic padding (each batch pads
    to a similar length; the scores are mapped back by the orders), unsorted with --pad_to_max_length (orders
    None)."""
    train_dataset, query_dataset = (
        pipeline.tokenize(d, args.dataset_name, tokenizer, args.max_seq_length, args.pad_to_max_length)
        for d in (train_text, query_text))
    if args.pad_to_max_length:
        return (train_dataset, query_dataset), (None, None)
    train_order, query_order = pipeline.length_order(train_dataset), pipeline.length_order(query_dataset)
    return (train_dataset.select(train_order), query_dataset.select(query_order)), (train_order, query_order)


def prepare(args, model, tokenizer, train_text, query_text) -> tuple:
    """The splits of `sorted_splits`, the model wrapped for kronfluence with the token-factored trackers, and
    `analyzer_at(folder)`."""
    (train_dataset, query_dataset), (train_order, query_order) = sorted_splits(args, tokenizer, train_text,
                                                                               query_text)
    analysis_task = GlueTask(tracked_modules(model, args.tracked_modules))
    model = prepare_model(model.double() if args.float64 else model, analysis_task)
    if not args.stock_kronfluence:
        fast_factors.install_fast_trackers(model)
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model.cuda(), device_ids=[torch.cuda.current_device()])

    def analyzer_at(root: str) -> Analyzer:
        analyzer = Analyzer(analysis_name=os.path.basename(root), model=model, task=analysis_task,
                            cpu=args.device == "cpu", profile=args.profile, output_dir=os.path.dirname(root))
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pipeline.collator(tokenizer)))
        return analyzer

    return analyzer_at, (query_dataset, train_dataset), (train_order, query_order)


def join_torchrun(device: str) -> bool:
    """Under torchrun (even with one process: kronfluence's DDP path), joins the process group. True on the main
    process, the one that decides and writes."""
    if "LOCAL_RANK" not in os.environ:
        return True
    if not torch.cuda.is_available() or device == "cpu":
        raise UserError("torchrun without CUDA: kronfluence only synchronises factors across CUDA processes, so a "
                        "CPU launch would fit wrong factors; run one process instead")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # The main process may wait on another process's lock for long: the others must not time out meanwhile.
    torch.distributed.init_process_group(backend="nccl", timeout=datetime.timedelta(days=1))
    return torch.distributed.get_rank() == 0


def signatures(args, provenance: dict, factor_args, score_args) -> tuple:
    """Everything that changes the factors, and the scores: a result is reused only for the same signature."""
    factors = {**{k: provenance[k] for k in ("checkpoint_sha256", "dataset_name", "num_train", "train_data",
                                             "max_seq_length")},
               "pad_to_max_length": args.pad_to_max_length, "tracked_modules": args.tracked_modules,
               "float64": args.float64, "seed": args.seed, "factor_args": factor_args.to_str_dict()}
    scores = {**factors, "num_query": provenance["num_query"], "query_data": provenance["query_data"],
              "score_args": score_args.to_str_dict(), "self_scores": args.compute_self_scores}
    return factors, scores


def analyze_checkpoint(args, checkpoint_dir: str, suffix: str, train_text, query_text, main_process: bool) -> str:
    """Factors and scores of one checkpoint (an ensemble member's named with `suffix`): reused when published with
    the same signature, else computed and published. Returns the scores' name."""
    model, tokenizer, checkpoint_meta = pipeline.load_checkpoint(checkpoint_dir, args.dataset_name,
                                                                 args.attn_implementation)
    factors_name, factor_args, scores_name, score_args = influence_arguments(args)
    scores_name = scores_name + suffix
    scores_public = artifacts.scores_dir(args.output_dir, args.dataset_name, scores_name)
    provenance = {**pipeline.data_provenance(args.dataset_name, train_text, query_text, args.max_seq_length),
                  "data_dir": args.data_dir, "model_name_or_path": args.model_name_or_path,
                  "checkpoint_sha256": checkpoint_meta["files"]["model.safetensors"]["sha256"]}
    if args.factor_strategy == "trak":
        factors_signature, scores_signature = None, trak_signature(args, provenance)
    else:
        factors_signature, scores_signature = signatures(args, provenance, factor_args, score_args)

    logger.info("***** Running influence analysis *****")
    logger.info("  Task = %s, train = %d, queries = %d, strategy = %s, scores = %s, batch sizes = %d queries x %d "
                "train, device = %s", args.dataset_name, len(train_text), len(query_text), args.factor_strategy,
                scores_name, args.query_batch_size, args.train_batch_size, args.device)
    with artifacts.lock(scores_public, enabled=main_process):
        meta = on_main(artifacts.reuse, scores_public, artifacts.SCORES_META, "scores", scores_signature,
                       args.overwrite, "another --scores_name or --output_dir")
        if meta is not None:
            logger.info("Reusing scores %s", scores_public)
            return scores_name
        meta = {"signature": scores_signature, "provenance": provenance, "order": "dataset",
                "scores_name": scores_name, "strategy": args.factor_strategy,
                "checkpoint_dir": checkpoint_dir, "checkpoint_metrics": checkpoint_meta.get("metrics"),
                "shape": [len(query_text), len(train_text)], "args": vars(args), "overrides": args.overrides}
        scores_root = artifacts.staging_dir(scores_public, scores_signature)
        on_main(shutil.rmtree, scores_root, ignore_errors=True)
        if args.factor_strategy == "trak":
            compute_trak(args, model, tokenizer, (train_text, query_text), scores_root, scores_public, meta)
            return scores_name
        analyzer_at, datasets, orders = prepare(args, model, tokenizer, train_text, query_text)
        factors_name += suffix
        factors_public = os.path.join(args.output_dir, args.dataset_name, f"factors_{factors_name}")
        meta["factors_name"] = factors_name
        with artifacts.lock(factors_public, enabled=main_process):
            search = args.device != "cpu" and not torch.distributed.is_initialized()
            factor_batch_size = args.factor_batch_size or (None if search else args.train_batch_size)
            factors_meta = fit_factors(analyzer_at, factors_public, factors_signature, factors_name, factor_args,
                                       datasets[1], factor_batch_size, args.seed, args.overwrite)
            # A snapshot: another process may replace the published factors while these scores are computed.
            on_main(artifacts.link_tree, factors_public, os.path.join(scores_root, f"factors_{factors_name}"))
        meta.update({k: v for k, v in factors_meta.items() if k.endswith("_seconds")})
        compute_scores(analyzer_at(scores_root), scores_root, scores_public, args, (factors_name, scores_name),
                       score_args, datasets, orders, meta, train_text)
    return scores_name


def trak_signature(args, provenance: dict) -> dict:
    """Everything that changes TRAK scores."""
    return {**{k: provenance[k] for k in ("checkpoint_sha256", "dataset_name", "num_train", "train_data",
                                          "max_seq_length", "num_query", "query_data")},
            "pad_to_max_length": args.pad_to_max_length, "tracked_modules": args.tracked_modules, "seed": args.seed,
            "trak": {"proj_dim": args.proj_dim, "proj_type": "normal", "featurised": "nn.Linear weights and biases",
                     "traker": importlib.metadata.version("traker")}}


def compute_trak(args, model, tokenizer, texts: tuple, root: str, public: str, meta: dict) -> None:
    """TRAK scores of one checkpoint (trak_scores.py), computed in the private folder on `sorted_splits`,
    written in dataset order as kronfluence's layout (`all_modules`), then published."""
    import trak_scores

    if torch.distributed.is_initialized():
        raise UserError("--factor_strategy trak runs in one process; launch it without torchrun")
    (train_dataset, query_dataset), (train_order, query_order) = sorted_splits(args, tokenizer, *texts)
    start = time.time()
    scores = trak_scores.compute(
        model, train_dataset, query_dataset, pipeline.collator(tokenizer),
        pipeline.get_task(args.dataset_name).is_regression, tracked_modules(model, args.tracked_modules),
        args.proj_dim, (args.train_batch_size, args.query_batch_size), os.path.join(root, "traker"), seed=args.seed,
        device=args.device, verbose=args.verbose)
    meta["scores_seconds"] = time.time() - start
    work = os.path.join(root, f"scores_{meta['scores_name']}")
    os.makedirs(work)
    scores = torch.from_numpy(scores)
    if train_order is not None:
        scores = pipeline.to_dataset_order(scores, train_order, query_order)
    save_file({"all_modules": scores}, os.path.join(work, "pairwise_scores.safetensors"))
    artifacts.publish(work, public, artifacts.SCORES_META, meta)
    shutil.rmtree(root, ignore_errors=True)
    artifacts.clean_staging(public)


def main():
    args = parse_args()
    cli.setup_logging(args.verbose)
    cli.log_configuration(args)
    main_process = join_torchrun(args.device)
    args.device = pipeline.torch_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32

    # Checkpoint(s) and data: the same examples, in the same order, as train.py; queries are the first validation
    # ones. An ensemble (train.py --seed A B ...) is analysed member by member, then combined.
    members = cli.checkpoints(args.checkpoint_dir, args.dataset_name, args.ensemble_seeds)
    ensemble = members[0][0] is not None
    if ensemble and (args.html is not None or args.compute_self_scores):
        raise UserError(f"{'--html' if args.html else '--compute_self_scores'} explains one model; "
                        f"{os.path.join(args.checkpoint_dir, args.dataset_name)} holds an ensemble")
    # A wrong checkpoint is named before any data is fetched; an ensemble's members differ only in their seed.
    recipes = [{k: m.get("args", {}).get(k) for k in cli.RECIPE_KEYS}
               for m in (pipeline.checkpoint_meta(d, args.dataset_name) for _, d in members)]
    for (_, checkpoint_dir), recipe in zip(members, recipes):
        if recipe != recipes[0]:
            changed = ", ".join(k for k in recipe if recipe[k] != recipes[0][k])
            raise UserError(f"{checkpoint_dir} was trained with another {changed} than {members[0][1]}; an ensemble's "
                            "members must share the recipe (pass --ensemble_seeds, or retrain them)")
    train_text, query_text = pipeline.load_train_and_queries(args.dataset_name, args.data_dir,
                                                             args.max_train_samples, args.max_query_examples,
                                                             args.label_noise, args.label_noise_seed)
    if args.inspect_query is not None and not 0 <= args.inspect_query < len(query_text):
        raise UserError(f"--inspect_query {args.inspect_query} is out of range: there are {len(query_text)} queries")
    if args.factor_strategy == "trak":
        args.proj_dim = args.proj_dim or min(2048, len(train_text) // 2)
        if args.proj_dim >= len(train_text):
            raise UserError(f"--proj_dim {args.proj_dim} is not below the {len(train_text)} training examples: TRAK "
                            f"inverts a singular Gram matrix then; pass --proj_dim {len(train_text) // 2}, say")
    artifacts.check_writable(args.output_dir)
    names = [analyze_checkpoint(args, checkpoint_dir, "" if seed is None else ensembles.member_name("", seed),
                                train_text, query_text, main_process) for seed, checkpoint_dir in members]
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not main_process:
        return
    scores_name = names[0]
    if ensemble:
        scores_name, _ = ensembles.publish(args.output_dir, args.dataset_name, influence_arguments(args)[2],
                                           [(seed, name) for (seed, _), name in zip(members, names)], args.overwrite)
        logger.info("Ensemble of %d checkpoints (seeds %s): %s", len(members), " ".join(str(s) for s, _ in members),
                    scores_name)

    scores, _ = artifacts.load_scores(args.output_dir, args.dataset_name, scores_name)
    scores_public = artifacts.scores_dir(args.output_dir, args.dataset_name, scores_name)
    logger.info("Scores %s (%d queries x %d training examples, dataset order): %s", scores_name, *scores.shape,
                os.path.join(scores_public, "pairwise_scores.safetensors"))
    if args.compute_self_scores:
        artifacts.load_scores(args.output_dir, args.dataset_name, scores_name, kind="self")  # verified
        ranking = os.path.join(scores_public, SELF_RANKING)
        logger.info("Training examples by self-influence (candidates for wrong labels first): %s", ranking)
        if args.inspect_self is not None:
            with open(ranking, newline="") as f:
                rows = list(csv.reader(f))
            print(f"\nTop {args.inspect_self} training examples by self-influence ({scores_name}):")
            for rank, index, score, label, *texts in rows[1:args.inspect_self + 1]:
                print(f"[{rank}. train {index}]  self-influence: {float(score):.4g}  label: {label}\n  "
                      + "\n  ".join(texts))
    if args.inspect_query is not None:
        pipeline.show_influences(scores, args.inspect_query, query_text, train_text, args.dataset_name, args.top_k,
                                 scores_name)
    if args.html is not None:
        picks = top_examples(scores[args.inspect_query], args.top_k)
        checkpoint_dir = members[0][1]
        factors_name, _, _, score_args = influence_arguments(args)
        factors_public = os.path.join(args.output_dir, args.dataset_name, f"factors_{factors_name}")
        model, tokenizer, _ = pipeline.load_checkpoint(checkpoint_dir, args.dataset_name, args.attn_implementation)
        tokens = token_scores(args, model, tokenizer, factors_public, factors_name, score_args,
                              query_text.select([args.inspect_query]), train_text.select(picks))
        write_token_report(args, tokenizer, scores, picks, tokens, query_text, train_text, scores_name)


if __name__ == "__main__":
    cli.cli(main)
