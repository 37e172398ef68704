"""Influence fitting and scoring with kronfluence, as analyze.py runs it: factors, then pairwise (and self) scores of
one checkpoint, each computed in a private folder and published once complete (results.py).

- Staging and resume: factors are fitted stage by stage (covariance, eigendecomposition, Lambda); each finished stage
  is recorded with its files' sha256, so a killed fit resumes after the last stage that verifies, and each stage is
  seeded, so the resumed factors equal an uninterrupted fit's.
- Dynamic padding: training examples and queries are sorted by length, so each batch pads to a similar length, and
  the scores are mapped back to dataset order before they are published.
- DDP: under torchrun every rank computes, the main rank alone decides and writes (`on_main`).
- The token-factored trackers (fast_factors.py) replace kronfluence's for Lambda and self-influence.
"""

import copy
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import transformers
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import load_file, save_file
from torch import nn

from . import checkpoints, fast_factors, pipeline, progress, results
from .errors import GlueError
from .failpoints import failpoint
from .scores import SCORES_META, SELF_RANKING, scores_dir
from .scoring import publish_scores, reorder_scores, sorted_splits, tracked_modules
from .task import GlueTask

logger = logging.getLogger(__name__)
# The kronfluence Task the factors and scores are computed with. A library user may put their own subclass here (a
# loss instead of the margin, say): its class and `measurement` are in the signatures, so no result of another Task
# is reused for it.
ANALYSIS_TASK = GlueTask
FACTORS_META = "glue_factors.json"
FACTOR_STAGES = ("covariance", "eigendecomposition", "lambda")
INDEX_STRATEGIES = ("ekfac_index", "kfac_index")  # gradient_index.py: <preconditioner>_index


def influence_arguments(config) -> tuple:
    """(factors_name, factor_args, scores_name, score_args), named as the seed names them."""
    if config.factor_strategy == "trak":  # no factors: TRAK's curvature is its projected features' Gram matrix
        return None, None, config.scores_name or "trak", None
    index = config.factor_strategy in INDEX_STRATEGIES  # its eigen projection's bases: the K-FAC factors
    strategy = "kfac" if index else config.factor_strategy
    if config.use_half_precision:
        factor_args = all_low_precision_factor_arguments(strategy=strategy, dtype=torch.bfloat16)
        score_args = all_low_precision_score_arguments(damping_factor=config.damping_factor, dtype=torch.bfloat16)
    else:
        factor_args = FactorArguments(strategy=strategy)
        score_args = ScoreArguments(damping_factor=config.damping_factor)
    factor_args.use_empirical_fisher = config.use_empirical_fisher
    if config.float64:
        for name in ("activation_covariance_dtype", "gradient_covariance_dtype", "eigendecomposition_dtype",
                     "lambda_dtype", "per_sample_gradient_dtype"):
            setattr(factor_args, name, torch.float64)
        for name in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype", "query_gradient_svd_dtype"):
            setattr(score_args, name, torch.float64)
    factors_name = strategy + ("_half" if config.use_half_precision else "")
    if config.task is not None:  # another measurement: its own factors and scores (<strategy>_<Task class>)
        factors_name += f"_{config.task.__name__}"
    if index:
        subset = config.index_factor_examples
        factors_name += f"_first{subset}" if subset else ""
        return factors_name, factor_args, config.scores_name or index_name(config), None
    scores_name = factors_name
    if config.query_gradient_rank is not None:
        score_args.query_gradient_low_rank = config.query_gradient_rank
        score_args.query_gradient_accumulation_steps = 10  # as kronfluence's default_score_arguments
        scores_name += f"_qlr{config.query_gradient_rank}"
    return factors_name, factor_args, config.scores_name or scores_name, score_args


def factor_bytes(model: nn.Module, modules: list | None, factor_args) -> int:
    """The factors' size on disk, known before fitting from the tracked nn.Linear shapes (d_in counts the bias):
    K-FAC and EK-FAC store two covariances and their eigenvectors (2 (d_in^2 + d_out^2) entries) and eigenvalues
    (d_in + d_out); EK-FAC and diagonal a d_out x d_in Lambda; identity nothing. Each stored tensor also costs an
    int64 count of the examples it has seen and its entry in the file's header (at most 160 bytes)."""
    tensors = {"identity": 0, "diagonal": 2, "kfac": 8, "ekfac": 10}[factor_args.strategy]
    entries = overhead = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (modules is not None and name not in modules):
            continue
        d_in, d_out = module.in_features + (module.bias is not None), module.out_features
        if factor_args.strategy in ("kfac", "ekfac"):
            entries += 2 * (d_in**2 + d_out**2) + d_in + d_out
        if factor_args.strategy in ("ekfac", "diagonal"):
            entries += d_in * d_out
        overhead += tensors * 160
    return entries * factor_args.activation_covariance_dtype.itemsize + overhead


def on_main(fn, *args, **kwargs):
    """Runs a decision or write on disk in the main process only and hands its result to every rank: under torchrun
    all ranks compute, one writes."""
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    result = [fn(*args, **kwargs) if main else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def fit_factors(analyzer_at, public: str, signature: dict, factors_name: str, factor_args, train_dataset,
                batch_size: int | None, seed: int, overwrite: bool, size: int = 0) -> dict:
    """Reuses the published factors for `signature`, or fits them in their private folder, resuming after the last
    stage whose files verify, and publishes them. Each stage is seeded (the true Fisher samples labels), so a
    resumed fit equals an uninterrupted one. A fit is refused before it starts if the factors' `size` (bytes,
    `factor_bytes`) does not fit on the disk."""
    meta = on_main(results.reuse, public, FACTORS_META, "factors", signature, overwrite, legacy=LEGACY_SIGNATURE)
    if meta is not None:
        logger.info("Reusing factors %s", public)
        return meta
    root = results.staging_dir(public, signature)
    work = os.path.join(root, f"factors_{factors_name}")
    on_main(results.check_free_space, os.path.dirname(public), size, "the factors")

    def resumable_stages():
        if overwrite:
            shutil.rmtree(root, ignore_errors=True)
        else:
            results.salvage_stages(public, FACTORS_META, signature, root, work, list(FACTOR_STAGES))
        return results.finished_stages(root, work, list(FACTOR_STAGES))

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
        progress.stage(f"fitting factors ({stage})", work)
        failpoint(f"before_{stage}")
        transformers.set_seed(seed + i)
        before, start = results.files_in(work), time.time()
        run()
        timings[f"{stage}_seconds"] = time.time() - start
        on_main(results.record_stage, root, work, stage, before)
        failpoint(f"after_{stage}")

    def publish():
        published = results.publish(work, public, FACTORS_META, {
            "signature": signature, "stages": results.stage_files(root, list(FACTOR_STAGES)), **timings})
        results.clean_staging(public)
        return published

    return on_main(publish)


def compute_scores(analyzer, root: str, public: str, config, names: tuple, score_args, datasets: tuple,
                   orders: tuple, meta: dict, train_text) -> dict:
    """Pairwise (and self) scores in the private folder `root`, where the factors are already linked; mapped back
    to dataset order there (with the self-influence ranking beside them), then published. Always from scratch: one
    stage, nothing to resume."""
    factors_name, scores_name = names
    query_dataset, train_dataset = datasets
    train_order, query_order = orders
    # The scores, and their copy in dataset order, before the first is replaced by the second.
    entries = (len(query_dataset) + config.compute_self_scores) * len(train_dataset)
    on_main(results.check_free_space, root, 2 * entries * score_args.score_dtype.itemsize, "the scores")
    progress.stage("computing scores", root)
    start = time.time()
    analyzer.compute_pairwise_scores(
        scores_name=scores_name, factors_name=factors_name, query_dataset=query_dataset,
        train_dataset=train_dataset, per_device_query_batch_size=config.query_batch_size,
        per_device_train_batch_size=config.train_batch_size, score_args=score_args, overwrite_output_dir=True)
    if config.compute_self_scores:
        analyzer.compute_self_scores(scores_name=scores_name, factors_name=factors_name, train_dataset=train_dataset,
                                     score_args=score_args, per_device_train_batch_size=config.train_batch_size,
                                     overwrite_output_dir=True)
    meta["scores_seconds"] = time.time() - start
    failpoint("scores_saved")
    work = os.path.join(root, f"scores_{scores_name}")

    def publish():
        if config.compute_self_scores:
            reorder_scores(os.path.join(work, "self_scores.safetensors"), train_order)
            self_scores = load_file(os.path.join(work, "self_scores.safetensors"))["all_modules"].float().numpy()
            write_self_ranking(os.path.join(work, SELF_RANKING), self_scores, train_text, config.dataset_name)
        return publish_scores(work, root, public, meta, orders)

    return on_main(publish)


def write_self_ranking(path: str, self_scores: np.ndarray, train_text, task_name: str) -> None:
    """Every training example, highest self-influence first (an example the model could only fit by memorising it:
    the candidates for a wrong label), with its label and text: what a researcher reads to clean the data."""
    task = pipeline.get_task(task_name)
    rows = []
    for rank, index in enumerate(np.argsort(-self_scores, kind="stable").tolist()):
        example = train_text[index]
        rows.append([rank + 1, index, f"{self_scores[index]:.6g}", task.label_name(example["label"]),
                     *(example[k] for k in task.keys)])
    results.write_csv(path, ["rank", "index", "self_influence", "label", *task.keys], rows)


def top_examples(row: np.ndarray, k: int) -> list:
    """The k most positively, then the k most negatively influential training examples (no index twice)."""
    order = np.argsort(-row, kind="stable")
    return list(dict.fromkeys([*order[:k].tolist(), *order[::-1][:k].tolist()]))


def token_scores(config, model, tokenizer, factors_public: str, factors_name: str, score_args, query,
                 train) -> np.ndarray:
    """Per-token influence of each training example in `train` on the one query: (examples, tokens), in `train`'s
    order, zero past each example's length. Computed by kronfluence (per-token and per-module scores, in one batch)
    for these few examples only: for the whole training set it would be queries x examples x tokens. Modules whose
    input has no token axis (the pooler, the classifier) act on the [CLS] state, so their scores go to [CLS]; so an
    example's per-token scores sum to its pairwise score."""
    analyzer_at, (query_dataset, train_dataset), (train_order, _) = setup_analysis(config, model, tokenizer, train,
                                                                                   query)
    staging = os.path.join(os.path.dirname(factors_public), results.STAGING)
    root = tempfile.mkdtemp(prefix=f"tokens-{os.getpid()}-", dir=staging)
    try:
        with results.lock(factors_public):
            results.read(factors_public, FACTORS_META, "factors")
            results.link_tree(factors_public, os.path.join(root, f"factors_{factors_name}"))
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


def setup_analysis(config, model, tokenizer, train_text, query_text) -> tuple:
    """The splits of `sorted_splits`, the model wrapped for kronfluence with the token-factored trackers, and
    `analyzer_at(folder)`."""
    (train_dataset, query_dataset), (train_order, query_order) = sorted_splits(config, tokenizer, train_text,
                                                                               query_text)
    analysis_task = analysis_task_class(config)(tracked_modules(model, config.tracked_modules))
    model = prepare_model(model.double() if config.float64 else model, analysis_task)
    if not config.stock_kronfluence:
        fast_factors.install_fast_trackers(model)
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model.cuda(), device_ids=[torch.cuda.current_device()])

    def analyzer_at(root: str) -> Analyzer:
        analyzer = Analyzer(analysis_name=os.path.basename(root), model=model, task=analysis_task,
                            cpu=config.device == "cpu", profile=config.profile, output_dir=os.path.dirname(root))
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pipeline.collator(tokenizer)))
        return analyzer

    return analyzer_at, (query_dataset, train_dataset), (train_order, query_order)


def join_torchrun(device: str) -> bool:
    """Under torchrun (even with one process: kronfluence's DDP path), joins the process group. True on the main
    process, the one that decides and writes."""
    if "LOCAL_RANK" not in os.environ:
        return True
    if not torch.cuda.is_available() or device == "cpu":
        raise GlueError("torchrun without CUDA: kronfluence only synchronises factors across CUDA processes, so a "
                        "CPU launch would fit wrong factors; run one process instead")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # The main process may wait on another process's lock for long: the others must not time out meanwhile.
    torch.distributed.init_process_group(backend="nccl", timeout=datetime.timedelta(days=1))
    return torch.distributed.get_rank() == 0


def analysis_task_class(config):
    """The kronfluence Task class of an analysis: the configuration's (`task`), else `ANALYSIS_TASK`."""
    return config.task or ANALYSIS_TASK


def task_signature(task_class=None) -> dict:
    """The Task in a signature: its class and what it measures (`measurement`; None when the class does not say).
    GlueTask keeps the name signatures first gave it, `task.GlueTask` (task.py, the shim of glue_attribution/task.py
    that re-exports it), so factors and scores published then are still reused."""
    task_class = task_class or ANALYSIS_TASK
    name = "task.GlueTask" if task_class is GlueTask else f"{task_class.__module__}.{task_class.__qualname__}"
    return {"class": name, "measurement": getattr(task_class, "measurement", None)}


# Factors and scores published before signatures named the Task were computed with GlueTask: the only Task then.
LEGACY_SIGNATURE = {"task": task_signature(GlueTask)}


def signatures(config, provenance: dict, factor_args, score_args) -> tuple:
    """Everything that changes the factors, and the scores: a result is reused only for the same signature."""
    factors = {"task": task_signature(analysis_task_class(config)),
               **{k: provenance[k] for k in ("checkpoint_sha256", "dataset_name", "num_train", "train_data",
                                             "max_seq_length")},
               "pad_to_max_length": config.pad_to_max_length, "tracked_modules": config.tracked_modules,
               "float64": config.float64, "seed": config.seed, "factor_args": factor_args.to_str_dict()}
    scores = {**factors, "num_query": provenance["num_query"], "query_data": provenance["query_data"],
              "score_args": score_args.to_str_dict(), "self_scores": config.compute_self_scores}
    return factors, scores


def analyze_checkpoint(config, checkpoint_dir: str, suffix: str, train_text, query_text, main_process: bool) -> str:
    """Factors and scores of one checkpoint (an ensemble member's named with `suffix`): reused when published with
    the same signature, else computed and published. Returns the scores' name."""
    model, tokenizer, checkpoint_meta = checkpoints.load_checkpoint(checkpoint_dir, config.dataset_name,
                                                                 config.attn_implementation)
    factors_name, factor_args, scores_name, score_args = influence_arguments(config)
    scores_name = scores_name + suffix
    scores_public = scores_dir(config.output_dir, config.dataset_name, scores_name)
    provenance = {**pipeline.data_provenance(config.dataset_name, train_text, query_text, config.max_seq_length),
                  "data_dir": config.data_dir, "model_name_or_path": config.model_name_or_path,
                  "checkpoint_sha256": checkpoint_meta["files"]["model.safetensors"]["sha256"]}
    if config.factor_strategy == "trak":
        from . import trak_scores  # traker: only for --factor_strategy trak

        factors_signature, scores_signature = None, trak_scores.signature(config, provenance)
    elif config.factor_strategy in INDEX_STRATEGIES:
        factors_signature, scores_signature = None, {**index_signature(config, provenance),
                                                     "num_query": provenance["num_query"],
                                                     "query_data": provenance["query_data"],
                                                     "normalize": config.index_normalize}
    else:
        factors_signature, scores_signature = signatures(config, provenance, factor_args, score_args)

    logger.info("***** Running influence analysis *****")
    logger.info("  Task = %s, train = %d, queries = %d, strategy = %s, scores = %s, batch sizes = %d queries x %d "
                "train, device = %s", config.dataset_name, len(train_text), len(query_text), config.factor_strategy,
                scores_name, config.query_batch_size, config.train_batch_size, config.device)
    with results.lock(scores_public, enabled=main_process):
        meta = on_main(results.reuse, scores_public, SCORES_META, "scores", scores_signature,
                       config.overwrite, "another --scores_name or --output_dir",
                       legacy=None if config.factor_strategy == "trak" else LEGACY_SIGNATURE)
        if meta is not None:
            logger.info("Reusing scores %s", scores_public)
            return scores_name
        meta = {"signature": scores_signature, "provenance": provenance, "order": "dataset",
                "scores_name": scores_name, "strategy": config.factor_strategy,
                "checkpoint_dir": checkpoint_dir, "checkpoint_metrics": checkpoint_meta.get("metrics"),
                "shape": [len(query_text), len(train_text)], "args": config.to_dict(), "overrides": config.overrides}
        scores_root = results.staging_dir(scores_public, scores_signature)
        on_main(shutil.rmtree, scores_root, ignore_errors=True)
        if config.factor_strategy == "trak":
            trak_scores.publish_trak(config, model, tokenizer, (train_text, query_text), scores_root, scores_public,
                                     meta)
            return scores_name
        if config.factor_strategy in INDEX_STRATEGIES:
            published = publish_index_scores(config, checkpoint_dir, suffix, (model, tokenizer),
                                             (train_text, query_text), (factors_name + suffix, factor_args),
                                             scores_root, scores_public, meta)
            return scores_name if published else None
        size = factor_bytes(model, tracked_modules(model, config.tracked_modules), factor_args)  # before wrapping
        analyzer_at, datasets, orders = setup_analysis(config, model, tokenizer, train_text, query_text)
        factors_name += suffix
        factors_public = os.path.join(config.output_dir, config.dataset_name, f"factors_{factors_name}")
        meta["factors_name"] = factors_name
        with results.lock(factors_public, enabled=main_process):
            search = config.device != "cpu" and not torch.distributed.is_initialized()
            factor_batch_size = config.factor_batch_size or (None if search else config.train_batch_size)
            factors_meta = fit_factors(analyzer_at, factors_public, factors_signature, factors_name, factor_args,
                                       datasets[1], factor_batch_size, config.seed, config.overwrite, size)
            # A snapshot: another process may replace the published factors while these scores are computed.
            on_main(results.link_tree, factors_public, os.path.join(scores_root, f"factors_{factors_name}"))
        meta.update({k: v for k, v in factors_meta.items() if k.endswith("_seconds")})
        compute_scores(analyzer_at(scores_root), scores_root, scores_public, config, (factors_name, scores_name),
                       score_args, datasets, orders, meta, train_text)
    return scores_name


# ----------------------------------------------------------------------------------------------------------------------
# What analyze.py checks before any work, and the token-level view after it

def check_members(config, members: list) -> None:
    """Names a wrong checkpoint before any data is fetched. An ensemble (members with seeds) explains no single
    model (--html, self-influence), and its members differ only in their seed."""
    from .checkpoints import check_recipe
    from .config import RECIPE_KEYS

    if members[0][0] is not None and (config.html is not None or config.compute_self_scores or config.explorer_tokens):
        flag = ("--html" if config.html else "--compute_self_scores" if config.compute_self_scores
                else "--explorer_tokens")
        raise GlueError(f"{flag} explains one model; "
                        f"{os.path.dirname(members[0][1])} holds an ensemble")
    recipes = [{k: m.get("args", {}).get(k) for k in RECIPE_KEYS}
               for m in (checkpoints.checkpoint_meta(folder, config.dataset_name) for _, folder in members)]
    for (_, folder), recipe in zip(members, recipes):
        check_recipe(folder, recipe, recipes[0])


def check_queries(config, num_train: int, num_queries: int):
    """--inspect_query within the queries; TRAK's projection below the number of training examples (it inverts the
    Gram matrix of the projected training gradients, singular from proj_dim = examples on). Returns the configuration
    with the default --proj_dim filled in: half the training examples, at most 2048."""
    if config.inspect_query is not None and not 0 <= config.inspect_query < num_queries:
        raise GlueError(f"--inspect_query {config.inspect_query} is out of range: there are {num_queries} queries")
    if config.factor_strategy == "trak":
        config = dataclasses.replace(config, proj_dim=config.proj_dim or min(2048, num_train // 2))
        if config.proj_dim >= num_train:
            raise GlueError(f"--proj_dim {config.proj_dim} is not below the {num_train} training examples: TRAK "
                            f"inverts a singular Gram matrix then; pass --proj_dim {num_train // 2}, say")
    return config


def leave_torchrun() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fitted_factors(config) -> tuple:
    """(factors name, its published folder, score arguments) of the analysis: what per-token scoring reuses."""
    factors_name, _, _, score_args = influence_arguments(config)
    return factors_name, os.path.join(config.output_dir, config.dataset_name, f"factors_{factors_name}"), score_args


def token_report(config, checkpoint_dir: str, scores: np.ndarray, scores_name: str, query_text, train_text) -> None:
    """--html: the per-token influence of the query's top examples, as a page with its numbers beside it."""
    from . import report

    progress.stage("the token-level report", os.path.dirname(os.path.abspath(config.html)))
    picks = top_examples(scores[config.inspect_query], config.top_k)
    factors_name, factors_public, score_args = fitted_factors(config)
    model, tokenizer, _ = checkpoints.load_checkpoint(checkpoint_dir, config.dataset_name, config.attn_implementation)
    tokens = token_scores(config, model, tokenizer, factors_public, factors_name, score_args,
                          query_text.select([config.inspect_query]), train_text.select(picks))
    report.write_token_report(config, tokenizer, scores, picks, tokens, query_text, train_text, scores_name)


def explorer_tokens(config, checkpoint_dir: str, scores: np.ndarray, train_text, query_text) -> dict:
    """--explorer_tokens N: the words, with their influence, of the top --top_k examples per side of the first N
    queries, for the explorer's shading ({query: {training index: report.words}}). One kronfluence pass of 2 x top_k
    examples per query, with the factors already fitted."""
    from tqdm.auto import tqdm

    from . import report

    progress.stage("the explorer's token scores", os.path.join(config.output_dir, config.dataset_name))
    task = pipeline.get_task(config.dataset_name)
    factors_name, factors_public, score_args = fitted_factors(config)
    shaded = {}
    for q in tqdm(range(min(config.explorer_tokens, len(query_text))), desc="Token scores", unit="query"):
        # kronfluence wraps the model's modules in place: each pass gets a fresh copy
        model, tokenizer, _ = checkpoints.load_checkpoint(checkpoint_dir, config.dataset_name,
                                                          config.attn_implementation)
        picks = top_examples(scores[q], config.top_k)
        tokens = token_scores(config, model, tokenizer, factors_public, factors_name, score_args,
                              query_text.select([q]), train_text.select(picks))
        shaded[q] = {}
        for j, row in zip(picks, tokens):
            texts = [train_text[j][key] for key in task.keys]
            encoding = tokenizer(*texts, truncation=True, max_length=config.max_seq_length, return_offsets_mapping=True)
            shaded[q][j] = report.words(encoding, texts, row)
    return shaded


# ----------------------------------------------------------------------------------------------------------------------
# The gradient index (gradient_index.py) as analyze.py runs it: factors for its bases, the build, scores from it

def index_config(config):
    """The gradient index's own configuration (gradient_index.IndexConfig) from the analysis's index fields."""
    from .gradient_index import IndexConfig

    return IndexConfig(rank=config.index_rank, projection=config.index_projection,
                       preconditioner=config.factor_strategy.removesuffix("_index"),
                       damping_factor=config.damping_factor, normalize=config.index_normalize, float64=config.float64,
                       store_dtype=config.index_store_dtype, batch_size=config.train_batch_size,
                       chunk_size=config.index_chunk_size, seed=config.seed)


def index_name(config) -> str:
    """<preconditioner>_index_k<K>[_random][_damp<D>][_fp16][_<Task class>][_cos]: the score set's and the index's
    name (k: per side and module; D: a --damping_factor other than the default; a configuration's own Task, as for
    factors)."""
    rank = "full" if config.index_rank is None else f"k{config.index_rank}"
    damping = ("" if config.damping_factor == 1e-8 else "_damp_auto" if config.damping_factor is None
               else f"_damp{config.damping_factor:g}")
    return (f"{config.factor_strategy}_{rank}" + ("_random" if config.index_projection == "random" else "") + damping
            + ("_fp16" if config.index_store_dtype == "float16" else "")
            + (f"_{config.task.__name__}" if config.task is not None else "")
            + ("_cos" if config.index_normalize else ""))


def index_signature(config, provenance: dict) -> dict:
    """Everything that changes the stored gradients: the checkpoint, the training data, the compression."""
    return {"task": task_signature(analysis_task_class(config)),
            **{k: provenance[k] for k in ("checkpoint_sha256", "dataset_name", "num_train", "train_data",
                                          "max_seq_length")},
            "pad_to_max_length": config.pad_to_max_length, "tracked_modules": config.tracked_modules,
            "use_empirical_fisher": config.use_empirical_fisher, "index_factor_examples": config.index_factor_examples,
            **index_config(config).signature()}


def index_dir(config, suffix: str = "") -> str:
    """Where the index lives: <output_dir>/<task>/index_<index name without _cos><member suffix>; the _cos scores
    and any --scores_name read the same index."""
    name = index_name(config).removesuffix("_cos")
    return os.path.join(config.output_dir, config.dataset_name, f"index_{name}{suffix}")


def index_bases(config, checkpoint_sha256: str, model, tokenizer, texts: tuple, factors: tuple, modules: dict,
                indexing) -> tuple:
    """The projection of each module: the top-k eigenvectors of K-FAC factors fitted (or reused) on the first
    --index_factor_examples training examples, or a seeded random projection. Returns (bases, factors meta)."""
    from . import gradient_index

    if indexing.projection == "random":
        return gradient_index.random_bases(modules, indexing.rank, indexing.seed, indexing.dtype), None
    factors_name, factor_args = factors
    train_text, query_text = texts
    subset = train_text.select(range(min(config.index_factor_examples or len(train_text), len(train_text))))
    provenance = {**pipeline.data_provenance(config.dataset_name, subset, query_text, config.max_seq_length),
                  "checkpoint_sha256": checkpoint_sha256}
    signature, _ = signatures(config, provenance, factor_args, ScoreArguments())
    analyzer_at, (_, train_dataset), _ = setup_analysis(config, copy.deepcopy(model), tokenizer, subset, query_text)
    public = os.path.join(config.output_dir, config.dataset_name, f"factors_{factors_name}")
    with results.lock(public):
        meta = fit_factors(analyzer_at, public, signature, factors_name, factor_args, train_dataset,
                           config.factor_batch_size or config.train_batch_size, config.seed, config.overwrite)
        bases = gradient_index.eigen_bases(modules, public, indexing.rank, indexing.dtype)
    return bases, meta


def publish_index_scores(config, checkpoint_dir: str, suffix: str, loaded: tuple, texts: tuple, factors: tuple,
                         root: str, public: str, meta: dict) -> bool:
    """Builds (or reuses) the checkpoint's gradient index, then publishes the queries' scores against it, with the
    self-influence of every training example (free: it is in the index). False while other shards' chunks of the
    index are missing."""
    from . import gradient_index

    model, tokenizer = loaded
    train_text, query_text = texts
    indexing = index_config(config)
    sha = meta["provenance"]["checkpoint_sha256"]
    model = model.double() if config.float64 else model
    modules = gradient_index.linear_modules(model, tracked_modules(model, config.tracked_modules))
    bases, factors_meta = index_bases(config, sha, model, tokenizer, texts, factors, modules, indexing)
    train_dataset, query_dataset = (pipeline.tokenize(d, config.dataset_name, tokenizer, config.max_seq_length,
                                                      config.pad_to_max_length) for d in texts)
    collate, task = pipeline.collator(tokenizer), analysis_task_class(config)()
    folder = index_dir(config, suffix)
    index_meta = gradient_index.build_index(model.to(config.device), train_dataset, collate, task, modules, bases,
                                            indexing, folder, index_signature(config, meta["provenance"]),
                                            config.shard_index, config.num_shards, config.overwrite)
    if index_meta is None:
        return False
    start = time.time()
    index = gradient_index.GradientIndex.load(folder, sha)
    query_rows = index.query_rows(model, query_dataset, collate, task.compute_measurement, config.query_batch_size)
    scores = index.scores(query_rows, indexing.normalize)
    meta.update({"index_dir": folder, "index_build_seconds": index_meta["build_seconds"],
                 "index_merge_seconds": index_meta["merge_seconds"], "index_bytes": index_meta["bytes"],
                 "scores_seconds": time.time() - start, "checkpoint_dir": checkpoint_dir,
                 **({f"factors_{k}": v for k, v in factors_meta.items() if k.endswith("_seconds")}
                    if factors_meta else {})})
    work = os.path.join(root, "scores")
    os.makedirs(work, exist_ok=True)
    save_file({"all_modules": scores.float().contiguous()}, os.path.join(work, "pairwise_scores.safetensors"))
    self_scores = index.self_influence.float()
    save_file({"all_modules": self_scores.contiguous()}, os.path.join(work, "self_scores.safetensors"))
    write_self_ranking(os.path.join(work, SELF_RANKING), self_scores.numpy(), train_text, config.dataset_name)
    results.publish(work, public, SCORES_META, meta)
    shutil.rmtree(root, ignore_errors=True)
    results.clean_staging(public)
    return True


def read_new_queries(config) -> "datasets.Dataset":  # noqa: F821
    """--query_text or --query_file as a split with the task's text columns and a label (-1: none given). A file is
    CSV, TSV (by its extension) or JSON lines; its columns must include the task's text columns."""
    import csv
    import json as json_lib

    from datasets import Dataset

    task = pipeline.get_task(config.dataset_name)
    if config.query_text is not None:
        if len(config.query_text) != len(task.keys):
            raise GlueError(f"--query_text takes {len(task.keys)} text(s) for {config.dataset_name} "
                            f"({', '.join(task.keys)}), got {len(config.query_text)}")
        rows = [{**dict(zip(task.keys, config.query_text)), "label": config.query_label}]
        where = "--query_text"
    else:
        path = config.query_file
        try:
            with open(path, newline="", encoding="utf-8") as f:
                if path.endswith((".json", ".jsonl")):
                    rows = [json_lib.loads(line) for line in f if line.strip()]
                else:
                    rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",",
                                               quoting=csv.QUOTE_NONE if path.endswith(".tsv") else csv.QUOTE_MINIMAL))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise GlueError(f"cannot read --query_file {path}: {err}") from None
        if not rows:
            raise GlueError(f"--query_file {path} has no rows")
        missing = [key for key in task.keys if key not in rows[0]]
        if missing:
            raise GlueError(f"--query_file {path} has no column {', '.join(repr(k) for k in missing)} (the "
                            f"{config.dataset_name} text columns are {', '.join(task.keys)}; found "
                            f"{', '.join(map(str, rows[0]))})")
        where = path
    queries = {key: [str(row[key]) for row in rows] for key in task.keys}
    labels = []
    for i, row in enumerate(rows):
        value = row.get("label")
        labels.append(-1 if value in (None, "") else
                      pipeline._parse_label(task, str(value), f"{where}, row {i + 1}, column 'label'"))
    return Dataset.from_dict({**queries, "label": labels})


def answer_new_queries(config, member: tuple, train_text) -> str:
    """Top influential training examples of texts the index has never seen: one pass over the queries' gradients
    and a product with the store. Prints them, writes them as JSON, returns the JSON's path. An exact strategy has no
    store: refused, with what a query would cost it."""
    from . import gradient_index, report

    _, _, scores_name, _ = influence_arguments(config)
    if config.factor_strategy not in INDEX_STRATEGIES:
        past = os.path.join(scores_dir(config.output_dir, config.dataset_name, scores_name), SCORES_META)
        cost = "a pass over every training gradient"
        if os.path.isfile(past):
            with open(past) as f:
                seconds = json.load(f).get("scores_seconds")
            cost += f" (the last {scores_name} scores took {seconds:.0f} s)" if seconds else ""
        raise GlueError(f"--factor_strategy {config.factor_strategy} keeps no training gradients: a new query costs "
                        f"{cost} for its {len(train_text)} training examples; build an index once with "
                        "--factor_strategy ekfac_index, then ask it")
    start = time.time()
    seed, checkpoint_dir = member  # an ensemble's first member answers
    model, tokenizer, checkpoint = checkpoints.load_checkpoint(checkpoint_dir, config.dataset_name,
                                                               config.attn_implementation)
    folder = index_dir(config, "" if seed is None else f"_{checkpoints.member(seed)}")
    index = gradient_index.GradientIndex.load(folder, checkpoint["files"]["model.safetensors"]["sha256"])
    if index.meta["signature"]["train_data"] != pipeline.fingerprint(train_text):
        raise GlueError(f"the gradient index in {folder} was built on other training data than "
                        f"{config.data_dir or 'the hub'}'s; rebuild it with --overwrite")
    loaded = time.time()
    queries = read_new_queries(config)
    model = (model.double() if config.float64 else model).to(config.device).eval()
    task, collate = pipeline.get_task(config.dataset_name), pipeline.collator(tokenizer)
    dataset = pipeline.tokenize(queries, config.dataset_name, tokenizer, config.max_seq_length)
    with torch.no_grad():  # the label to explain, where none is given: the model's prediction
        logits = torch.cat([model(**{k: v.to(config.device) for k, v in collate(
            [{k: v for k, v in dataset[i].items() if k != "labels"} for i in range(s, min(s + 64, len(dataset)))]
        ).items()}).logits for s in range(0, len(dataset), 64)])
    predicted = logits.argmax(-1).tolist() if not task.is_regression else logits[:, 0].tolist()
    labels = [p if y == -1 else y for y, p in zip(queries["label"], predicted)]
    dataset = dataset.remove_columns("labels").add_column("labels", labels)
    queries = queries.remove_columns("label").add_column("label", labels)
    rows = index.query_rows(model, dataset, collate, analysis_task_class(config)().compute_measurement,
                            config.query_batch_size, disable_tqdm=True)
    scores = index.scores(rows, config.index_normalize).float().numpy()
    seconds = time.time() - loaded
    answers = []
    for q in range(len(queries)):
        picks = top_examples(scores[q], config.top_k)
        answers.append({**{k: queries[q][k] for k in task.keys}, "label": task.label_name(labels[q]),
                        "predicted": task.label_name(predicted[q]),
                        "top": [{"index": j, "score": float(scores[q, j]),
                                 "label": task.label_name(train_text[j]["label"]),
                                 **{k: train_text[j][k] for k in task.keys}} for j in picks]})
        report.show_influences(scores, q, queries, train_text, config.dataset_name, config.top_k, scores_name)
    path = os.path.join(config.output_dir, config.dataset_name, f"new_queries_{scores_name}.json")
    results.atomic_write_json({"scores_name": scores_name, "index_dir": folder, "queries": answers,
                               "num_train": index.num_train, "load_seconds": loaded - start,
                               "query_seconds": seconds}, path)
    logger.info("%d new quer%s against %d training examples in %.2f s (index loaded in %.1f s)", len(queries),
                "y" if len(queries) == 1 else "ies", index.num_train, seconds, loaded - start)
    return path
