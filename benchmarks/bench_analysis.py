"""Seed recipe vs this project's analysis path, in one process, same model, data and device.

(a) seed: every example padded to 128 tokens, stock kronfluence trackers;
(b) project: dynamic padding over length-sorted splits, token-factored Lambda (fast_factors.py).

    python benchmarks/bench_analysis.py --quick                 # CPU, < 2 min: 2-layer MiniLM, 64 x 16
    python benchmarks/bench_analysis.py                         # CPU: packaged MiniLM, 128 train x 16 queries
    python benchmarks/bench_analysis.py --device cuda --model bert-base --num_train 4096 --num_query 175

Data: the first examples of SST-2 from --data_dir (skips cleanly where absent). Prints per-stage seconds for both,
the ratio, the per-query Spearman between their scores and an extrapolation to the whole SST-2 analysis (67,349
training examples x 872 queries in batches of --query_batch_size). Last lines: `speedup: X`, `spearman: Y`.
Factors are fitted in batches of --factor_batch_size (default --train_batch_size), never kronfluence's batch-size
search, so each recipe's time is its computation. --out writes the numbers as JSON after every stage (a killed run
keeps what it measured); benchmarks/gpu_checks.py runs this on a GPU.
"""

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments, default_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments, default_score_arguments
from kronfluence.utils.dataset import DataLoaderKwargs
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_attribution import fast_factors, pipeline, scoring  # noqa: E402
from glue_attribution.task import GlueTask  # noqa: E402

SST2_TRAIN, SST2_QUERIES, SEED_QUERY_BATCH = 67349, 872, 175
STAGES = ("covariance", "eigendecomposition", "lambda", "scores")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small CPU run (< 2 minutes).")
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert-base", "tiny"],
                        help="minilm: the packaged pretrained MiniLM; bert-base: random weights of bert-base shape; "
                             "tiny: a random 2-layer BERT of width 32 (dry runs, tests).")
    parser.add_argument("--tokenizer", default=pipeline.PACKAGED_MODEL,
                        help="Tokenizer name or folder (default: the packaged MiniLM's; a saved copy on a GPU "
                             "machine without the package).")
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                           "glue_data"))
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--num_query", type=int, default=16)
    parser.add_argument("--query_batch_size", type=int, default=None, help="Default: all queries in one batch.")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--factor_batch_size", type=int, default=None,
                        help="Examples per batch when fitting factors (default: --train_batch_size).")
    parser.add_argument("--recipes", nargs="+", default=["seed", "project"], choices=["seed", "project"])
    parser.add_argument("--strategy", default="ekfac")
    parser.add_argument("--use_half_precision", action="store_true")
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON file for the numbers, rewritten after every stage.")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.num_query = 64, 16
    args.query_batch_size = args.query_batch_size or args.num_query
    args.factor_batch_size = args.factor_batch_size or args.train_batch_size
    return args


def save(report: dict, path: str | None) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)


def build_model(args, vocab_size: int):
    from transformers import AutoModelForSequenceClassification, BertConfig

    if args.model in ("bert-base", "tiny"):  # timing only: random weights (embeddings are not tracked)
        shape = {} if args.model == "bert-base" else {"hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "intermediate_size": 64}
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(BertConfig(vocab_size=vocab_size, num_labels=2,
                                                                         **shape))
    path = pipeline.resolve_model_path(pipeline.PACKAGED_MODEL)
    layers = {"num_hidden_layers": 2} if args.quick else {}
    transformers.set_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **layers)


def analyse(model, tokenizer, train_text, query_text, args, seed_recipe: bool, output_dir: str, times: dict,
            on_stage=lambda: None):
    """Fits factors and scores with one recipe, filling `times` (seconds per stage, `on_stage()` after each);
    returns the scores in dataset order."""
    train, queries = (pipeline.tokenize(d, "sst2", tokenizer, 128, pad_to_max_length=seed_recipe)
                      for d in (train_text, query_text))
    train_order = query_order = None
    if not seed_recipe:
        train_order, query_order = scoring.length_order(train), scoring.length_order(queries)
        train, queries = train.select(train_order), queries.select(query_order)
    task = GlueTask()
    model = prepare_model(copy.deepcopy(model).to(args.device), task)
    if not seed_recipe:
        fast_factors.install_fast_trackers(model)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=args.device == "cpu", disable_tqdm=True,
                        output_dir=output_dir)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pipeline.collator(tokenizer)))
    if args.use_half_precision:
        factor_args = all_low_precision_factor_arguments(args.strategy, torch.bfloat16)
        score_args = all_low_precision_score_arguments(dtype=torch.bfloat16)
    else:
        factor_args, score_args = default_factor_arguments(args.strategy), default_score_arguments()
    batch = {"dataset": train, "factor_args": factor_args, "per_device_batch_size": args.factor_batch_size}
    stages = {
        "covariance": lambda: analyzer.fit_covariance_matrices("f", **batch),
        "eigendecomposition": lambda: analyzer.perform_eigendecomposition("f", factor_args=factor_args),
        "lambda": lambda: analyzer.fit_lambda_matrices("f", **batch),
        "scores": lambda: analyzer.compute_pairwise_scores(
            "s", "f", query_dataset=queries, train_dataset=train, score_args=score_args,
            per_device_query_batch_size=args.query_batch_size, per_device_train_batch_size=args.train_batch_size),
    }
    for name, run in stages.items():
        transformers.set_seed(0)  # both recipes sample Fisher labels from the same stream
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - start
        on_stage()
    scores = analyzer.load_pairwise_scores("s")["all_modules"].float().cpu()
    if train_order is not None:
        scores = scoring.to_dataset_order(scores, train_order, query_order)
    return scores.numpy()


def extrapolate(times: dict, args) -> dict:
    """Seconds per stage for the whole SST-2 analysis: factor stages scale with training examples, scores with
    training examples x passes over them (one per query batch of the seed's 175; the per-example training gradients,
    not the query batch, dominate a pass)."""
    per_train = SST2_TRAIN / args.num_train
    passes = math.ceil(SST2_QUERIES / SEED_QUERY_BATCH) / math.ceil(args.num_query / args.query_batch_size)
    return {"covariance": times["covariance"] * per_train, "eigendecomposition": times["eigendecomposition"],
            "lambda": times["lambda"] * per_train, "scores": times["scores"] * per_train * passes}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.data_dir, "SST-2", "train.tsv")):
        print(f"skipped: no SST-2 under {args.data_dir} (pass --data_dir with a GLUE folder)")
        return {}
    # Set, not only enabled: gpu_checks.py runs several configurations in one process.
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    if args.allow_tf32:
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = pipeline.load_tokenizer(args.tokenizer)
    train_text = pipeline.load_glue("sst2", "train", args.data_dir, args.num_train)
    query_text = pipeline.load_glue("sst2", "validation", args.data_dir, args.num_query)
    model = build_model(args, tokenizer.vocab_size)
    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16" if args.use_half_precision else "tf32" if args.allow_tf32 else "fp32"
    print(f"device: {device_name}; model: {args.model}{' (2 layers)' if args.quick else ''}; "
          f"{len(train_text)} train x {len(query_text)} queries; {args.strategy} {precision}; batches: factors "
          f"{args.factor_batch_size}, train {args.train_batch_size}, queries {args.query_batch_size}")
    report = {"device": device_name, "model": args.model, "num_train": len(train_text), "num_query": len(query_text),
              "strategy": args.strategy, "precision": precision, "factor_batch_size": args.factor_batch_size,
              "train_batch_size": args.train_batch_size, "query_batch_size": args.query_batch_size}
    save(report, args.out)

    scores = {}
    for name in args.recipes:
        times = report[name] = {}
        with tempfile.TemporaryDirectory() as tmp:
            scores[name] = analyse(model, tokenizer, train_text, query_text, args, name == "seed", tmp, times,
                                   on_stage=lambda: save(report, args.out))
        times["factors"] = sum(times[s] for s in STAGES[:3])
        times["total"] = sum(times[s] for s in STAGES)
        whole = report[f"{name}_whole_sst2_s"] = extrapolate(times, args)
        whole["total"] = sum(whole.values())
        save(report, args.out)

    names, both = list(scores), len(scores) == 2
    print(f"\n{'stage':<20}" + "".join(f"{name + ' (s)':>14}" for name in names) + (f"{'ratio':>9}" if both else ""))
    for stage in (*STAGES, "factors", "total"):
        row = [report[name][stage] for name in names]
        print(f"{stage + (' (total)' if stage == 'factors' else ''):<20}" + "".join(f"{t:>14.2f}" for t in row)
              + (f"{row[0] / row[1]:>9.2f}" if both else ""))
    print(f"\nwhole SST-2 ({SST2_TRAIN} x {SST2_QUERIES}, query batches of {SEED_QUERY_BATCH}), extrapolated: "
          + ", ".join(f"{name} {report[f'{name}_whole_sst2_s']['total'] / 60:.1f} min" for name in names))
    if both:
        report["factor_speedup"] = report["seed"]["factors"] / report["project"]["factors"]
        report["speedup"] = report["seed"]["total"] / report["project"]["total"]
        report["spearman"] = float(np.mean([spearmanr(a, b)[0] for a, b in zip(scores["seed"], scores["project"])]))
        save(report, args.out)
        print(f"factor speedup: {report['factor_speedup']:.2f}")
        print(f"speedup: {report['speedup']:.2f}")
        print(f"spearman: {report['spearman']:.4f}")
    return report


if __name__ == "__main__":
    main()
