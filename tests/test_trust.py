"""Trust at the seams between results: a checkpoint pins its training data, a sealed ground truth is never altered
by a consumer, run files are verified, recipe differences are named, signals are never lost, flags are checked
before any training, and score sets name the Task they measured."""

import json
import os
import shutil

import numpy as np
import pytest

import evaluate_lds
import pipeline
from conftest import assert_user_error, run_script, write_glue_task, write_scores
from glue_attribution import lds, results

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
    with open(trained / "ck" / "rte" / pipeline.CHECKPOINT_META) as f:
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
                               f"{trained / 'bd' / 'RTE' / 'train.tsv'}", f"loads other examples from {other / 'bd' / 'RTE' / 'train.tsv'}",
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
