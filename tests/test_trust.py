"""Trust at the seams between results: a checkpoint pins its training data, a sealed ground truth is never altered
by a consumer, run files are verified, recipe differences are named, signals are never lost, flags are checked
before any training, and score sets name the Task they measured."""

import json
import os
import shutil
import signal

import numpy as np
import pytest

import evaluate_lds
from conftest import assert_user_error, run_script, write_glue_task, write_scores
from glue_attribution import lds, pipeline, results
from glue_attribution.checkpoints import CHECKPOINT_META, save_checkpoint
from glue_attribution.errors import GlueError

TRAIN = ["--dataset_name", "rte", "--max_train_samples", "16", "--max_eval_samples", "8", "--max_seq_length", "32",
         "--num_train_epochs", "1", "--train_batch_size", "8", "--learning_rate", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A checkpoint trained by train.py with a relative --data_dir, in its own working directory."""
    home = tmp_path_factory.mktemp("home")
    write_glue_task(home / "bd", "rte")
    result = run_script("train.py", *TRAIN, "--data_dir", "bd", "--model_name_or_path", tiny_model_dir,
                        "--checkpoint_dir", "ck", cwd=home)
    assert result.returncode == 0, result.stderr
    return home


def test_checkpoint_pins_its_training_data(trained, tmp_path):
    with open(trained / "ck" / "rte" / CHECKPOINT_META) as f:
        meta = json.load(f)
    assert meta["args"]["data_dir"] == str(trained / "bd")  # resolved when recorded
    train = pipeline.load_glue("rte", "train", str(trained / "bd"), 16)
    assert meta["data"]["train"] == {"path": str(trained / "bd" / "RTE" / "train.tsv"), "num_examples": 16,
                                     "fingerprint": pipeline.fingerprint(train)}
    assert meta["data"]["validation"]["path"] == str(trained / "bd" / "RTE" / "dev.tsv")

    # Another folder with a bd/ of other examples: without --data_dir the checkpoint's own data is read; naming
    # the other data is refused in one line, before any work.
    other = tmp_path / "elsewhere"
    write_glue_task(other / "bd", "rte", n_train=40)
    (other / "bd" / "RTE" / "train.tsv").write_text((other / "bd" / "RTE" / "train.tsv").read_text()
                                                   .replace("good", "bad"))
    common = ["--dataset_name", "rte", "--checkpoint_dir", str(trained / "ck"), "--output_dir", "out",
              "--max_query_examples", "4", "--factor_strategy", "identity", "--device", "cpu"]
    refused = run_script("analyze.py", *common, "--data_dir", "bd", cwd=other)
    assert_user_error(refused, f"the checkpoint at {trained / 'ck' / 'rte'} was trained on "
                               f"{trained / 'bd' / 'RTE' / 'train.tsv'}",
                      f"loads other examples from {other / 'bd' / 'RTE' / 'train.tsv'}",
                      f"pass --data_dir {trained / 'bd'}")
    assert not (other / "out").exists()
    # The same file changed after training: refused too, by every consumer.
    (trained / "bd" / "RTE" / "train.tsv").write_text((other / "bd" / "RTE" / "train.tsv").read_text())
    base = ["--dataset_name", "rte", "--checkpoint_dir", str(trained / "ck"), "--output_dir", "out", "--device", "cpu"]
    try:
        for script, extra in (("analyze.py", ["--factor_strategy", "identity"]),
                              ("run_counterfactual.py", ["--strategies", "identity"]),
                              ("detect_mislabeled.py", ["--strategies", "identity"]),
                              ("evaluate_lds.py", ["--num_masks", "3"])):
            extra = ["build", *extra] if script == "evaluate_lds.py" else extra
            refused = run_script(script, *extra, *base, cwd=other)
            assert_user_error(refused, "but that file has changed since", "retrain the checkpoint")
    finally:
        write_glue_task(trained / "bd", "rte")


def lds_argv(command: str, glue_dir, model_dir: str, folder, *extra: str) -> list:
    """A tiny ground truth: 3 masks x 2 repeats of 16 of 32 RTE fixture examples, 8 queries, 1 epoch."""
    return [command, "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path", model_dir,
            "--max_train_samples", "32", "--max_query_examples", "8", "--max_seq_length", "32", "--num_masks", "3",
            "--num_repeats", "2", "--num_train_epochs", "1", "--train_batch_size", "8", "--learning_rate", "1e-3",
            "--lds_dir", str(folder), "--device", "cpu", "--checkpoint_dir", str(folder) + "-none", *extra]


def mtimes(folder) -> dict:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns
            for name in ["ground_truth.json", "margins.npy", *(f"runs/{n}" for n in os.listdir(folder / "runs"))]}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory, glue_dir, tiny_model_dir):
    folder = tmp_path_factory.mktemp("sealed") / "gt"
    evaluate_lds.build(evaluate_lds.parse_args(lds_argv("build", glue_dir, tiny_model_dir, folder)))
    write_scores(folder.parent, "identity", np.random.default_rng(0).standard_normal((8, 32)), glue_dir)
    return folder


def copy_of(sealed, tmp_path):
    folder = tmp_path / "gt"
    shutil.copytree(sealed, folder)
    return folder


def test_run_files_record_their_build_and_are_sealed(sealed, glue_dir, tiny_model_dir, tmp_path):
    folder = copy_of(sealed, tmp_path)
    args = evaluate_lds.parse_args(lds_argv("build", glue_dir, tiny_model_dir, folder))
    with np.load(folder / "runs" / "mask0002_repeat001.npz") as run:
        assert (int(run["mask"]), int(run["repeat"]), int(run["seed"])) == (2, 1, lds.run_seed(0, 2, 1))
        assert str(run["ground_truth"]) == lds.signature(args)
    with open(folder / "ground_truth.json") as f:
        listed = json.load(f)["files"]
    assert listed["runs/mask0002_repeat001.npz"]["sha256"] == results.file_sha256(
        folder / "runs" / "mask0002_repeat001.npz")
    before = mtimes(folder)
    evaluate_lds.build(args)  # sealed and verified: reused, not merged and sealed again
    assert mtimes(folder) == before

    # A run file of another build (--seed 1) copied in: refused by `score`, which deletes nothing; redone by `build`.
    path = folder / "runs" / "mask0001_repeat000.npz"
    with np.load(path) as run:
        foreign = {**{k: run[k] for k in run.files}, "seed": np.array(lds.run_seed(1, 1, 0)),
                   "margins": run["margins"] + 1, "ground_truth": np.array("0123456789abcdef")}
    np.savez(path, **foreign)
    score = ["score", *lds_argv("", glue_dir, tiny_model_dir, folder)[1:], "--output_dir", str(sealed.parent),
             "--strategies", "identity", "--num_bootstrap", "10"]
    assert_user_error(run_script("evaluate_lds.py", *score),
                      "runs/mask0001_repeat000.npz does not match its recorded sha256",
                      f"repair it with: python evaluate_lds.py build --lds_dir {folder}")
    assert path.is_file()
    evaluate_lds.build(args)
    after = mtimes(folder)
    assert {k for k in after if after[k] != before[k]} == {"runs/mask0001_repeat000.npz", "ground_truth.json",
                                                           "margins.npy"}
    np.testing.assert_array_equal(np.load(folder / "margins.npy"), np.load(sealed / "margins.npy"))


def test_a_consumer_never_alters_a_legacy_sealed_ground_truth(sealed, glue_dir, tiny_model_dir, tmp_path, caplog):
    """A ground truth built and sealed before run files recorded their build (margins, correct, seed) and before
    the manifest listed them: accepted when what can be verified verifies; a damaged run is one line, not a
    deletion; `build` reuses it as it is, or repairs it."""
    folder = copy_of(sealed, tmp_path)
    for name in os.listdir(folder / "runs"):
        with np.load(folder / "runs" / name) as run:
            np.savez(folder / "runs" / name, **{k: run[k] for k in ("margins", "correct", "seed")})
    results.seal(str(folder), lds.GROUND_TRUTH_META, {k: v for k, v in json.load(open(folder / "ground_truth.json"))
                                                      .items() if k != "files"}, files=["masks.npy", "margins.npy"])
    score = evaluate_lds.parse_args(["score", *lds_argv("", glue_dir, tiny_model_dir, folder)[1:], "--output_dir",
                                     str(sealed.parent), "--strategies", "identity", "--num_bootstrap", "10"])
    evaluate_lds.score(score)
    with open(folder / "lds_results.json") as f:
        assert f.read().count('"noise_ceiling": {') == 1
    build = evaluate_lds.parse_args(lds_argv("build", glue_dir, tiny_model_dir, folder))
    before = mtimes(folder)
    evaluate_lds.build(build)
    assert mtimes(folder) == before

    path = folder / "runs" / "mask0000_repeat001.npz"
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(GlueError, match=f"{path} is damaged.*repair it with: python evaluate_lds.py build "
                                        f"--lds_dir {folder}$"):
        evaluate_lds.score(score)
    assert path.is_file() and os.path.getsize(path) == 100
    os.remove(path)  # a missing run: the LDS is scored, and the log says what the ceiling lacks
    evaluate_lds.score(score)
    assert f"No noise ceiling: {path} is missing" in caplog.text and "--num_repeats 2 or more" not in caplog.text
    evaluate_lds.build(build)  # repairs: the run redone, the margins the same
    with np.load(path) as run:
        assert int(run["mask"]) == 0 and int(run["repeat"]) == 1
    np.testing.assert_allclose(np.load(folder / "margins.npy"), np.load(sealed / "margins.npy"), atol=1e-6)


def test_no_signal_is_lost_while_tokenizing(monkeypatch, tiny_model_dir, glue_dir):
    """`datasets` hashes what it is given inside a bare `except:`: a Ctrl-C arriving then would be swallowed. A
    signal sent from inside every hash of a callable (the tokenizing function) must surface."""
    from datasets.fingerprint import Hasher

    sent, original = [], Hasher.update

    def update(self, value):
        if callable(value):
            sent.append(value)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, value)

    monkeypatch.setattr(Hasher, "update", update)
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    try:
        tokenized = pipeline.tokenize(pipeline.load_glue("rte", "train", str(glue_dir), 8), "rte", tokenizer, 32)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    assert bool(sent) == interrupted
    if not interrupted:
        assert len(tokenized) == 8 and "input_ids" in tokenized.column_names


def test_the_final_line_is_the_last(tiny_model_dir, glue_dir, tmp_path):
    result = run_script("train.py", *TRAIN, "--data_dir", str(glue_dir), "--model_name_or_path", tiny_model_dir,
                        "--checkpoint_dir", str(tmp_path), GLUE_KILL_AT="checkpoint_saved", GLUE_KILL_SIGNAL="TERM")
    assert result.returncode == 143
    assert_user_error(result, "terminated (SIGTERM) during saving the checkpoint; rerun the same command")
    assert not (tmp_path / "rte").exists()


def checkpoint_with_scores(root, tiny_model_dir, glue_dir, seed: int, **recipe) -> None:
    """A checkpoint saved as train.py saves it (untrained: what is checked is its record) and an identity score set
    computed from it, in <root>/ck and <root>/out."""
    import torch
    from safetensors.torch import save_file

    from glue_attribution.scores import SCORES_META, scores_dir

    torch.manual_seed(seed)
    model, tokenizer = pipeline.construct_model(tiny_model_dir, "rte"), pipeline.load_tokenizer(tiny_model_dir)
    arguments = {"data_dir": str(glue_dir), "model_name_or_path": tiny_model_dir, "max_seq_length": 32,
                 "max_train_samples": 32, "num_train_epochs": 1, "train_batch_size": 8, "learning_rate": 1e-3,
                 **recipe}
    save_checkpoint(model, tokenizer, str(root / "ck" / "rte"),
                             {"task": "rte", "num_labels": 2, "args": arguments})
    with open(root / "ck" / "rte" / CHECKPOINT_META) as f:
        sha = json.load(f)["files"]["model.safetensors"]["sha256"]
    train, queries = pipeline.load_train_and_queries("rte", str(glue_dir), 32, 8)
    public = scores_dir(str(root / "out"), "rte", "identity")
    staging = results.staging_dir(public, {"name": "identity"})
    os.makedirs(staging)
    save_file({"all_modules": torch.randn(8, 32)}, os.path.join(staging, "pairwise_scores.safetensors"))
    results.publish(staging, public, SCORES_META, {"shape": [8, 32], "provenance": {
        **pipeline.data_provenance("rte", train, queries, 32), "checkpoint_sha256": sha}})


def test_recipe_differences_are_named_and_each_checkpoint_keeps_its_results(sealed, glue_dir, tiny_model_dir,
                                                                             tmp_path, caplog):
    folder = copy_of(sealed, tmp_path)
    results_of = {}
    for seed, recipe in ((0, {"learning_rate": 1e-4, "num_train_epochs": 2}), (1, {})):
        root = tmp_path / f"checkpoint{seed}"
        checkpoint_with_scores(root, tiny_model_dir, glue_dir, seed, **recipe)
        caplog.clear()
        evaluate_lds.score(evaluate_lds.parse_args(
            ["score", "--lds_dir", str(folder), "--checkpoint_dir", str(root / "ck"), "--output_dir",
             str(root / "out"), "--strategies", "identity", "--num_bootstrap", "10", "--device", "cpu"]))
        with open(folder / "lds_results.json") as f:
            results_of[seed] = json.load(f)
        warned = [r.getMessage() for r in caplog.records if "another" in r.getMessage()]
        if recipe:
            assert len(warned) == 1 and "another learning_rate, num_train_epochs than the checkpoint" in warned[0]
            assert "learning_rate 0.0001 vs 0.001" in warned[0]
        else:
            assert not warned
    assert results_of[0]["recipe_differences"] == {"learning_rate": {"checkpoint": 1e-4, "ground_truth": 1e-3},
                                                   "num_train_epochs": {"checkpoint": 2, "ground_truth": 1}}
    assert results_of[1]["recipe_differences"] == {}
    # Side by side: each checkpoint's results (and figure) in its own folder, the first kept as it was.
    kept = sorted((folder / "by_checkpoint").iterdir())
    assert len(kept) == 2 and all((k / "lds.png").is_file() for k in kept)
    saved = [json.loads((k / "lds_results.json").read_text()) for k in kept]
    assert sorted(s["checkpoint"]["model_sha256"][0] for s in saved) == sorted(
        r["checkpoint"]["model_sha256"][0] for r in results_of.values())
    assert {json.dumps(s["results"], sort_keys=True) for s in saved} == {
        json.dumps(r["results"], sort_keys=True) for r in results_of.values()}


def test_a_sweep_claims_its_runs_one_by_one(tmp_path):
    """An item another process is computing is skipped, then waited for; it is not computed twice."""
    import threading

    from glue_attribution import sweeps

    done = set()
    taken, release = threading.Event(), threading.Event()

    def other():
        with results.lock(str(tmp_path / "run1")):
            taken.set()
            release.wait(10)
            done.add(1)

    thread = threading.Thread(target=other)
    thread.start()
    taken.wait(10)
    mine = []
    for item in sweeps.claimed([0, 1, 2], lambda i: str(tmp_path / f"run{i}"), lambda i: i in done):
        mine.append(item)
        done.add(item)
        if item == 2:
            release.set()
    thread.join()
    assert mine == [0, 2] and done == {0, 1, 2}


def test_two_identical_builds_split_the_runs(sealed, glue_dir, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    argv = lds_argv("build", glue_dir, tiny_model_dir, tmp_path / "gt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    both = [subprocess.Popen([sys.executable, str(ROOT / "evaluate_lds.py"), *argv], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in both]
    assert [p.returncode for p in both] == [0, 0], logs
    here = [int(log.split("Retrained ")[1].split()[0]) for log in logs if "Retrained " in log]
    assert sum(here) == 6, logs  # 3 masks x 2 repeats, each retrained once
    np.testing.assert_array_equal(np.load(tmp_path / "gt" / "margins.npy"), np.load(sealed / "margins.npy"))
