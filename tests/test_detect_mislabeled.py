"""detect_mislabeled.py: the detection metrics and rankings on constructed cases with a known answer, and the whole
experiment on a tiny model (noisy checkpoint with its epochs, self-influence at the end and along training, harm to
held-out queries, loss, AUM, cleanlab cross-validation, random; the fix-and-retrain sweep, sharded, killed and
resumed)."""

import json
import shlex
import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_script
from glue_attribution import cleaning, detection, ensembles, explorer, scores
from glue_attribution.checkpoints import trained_checkpoints
from glue_attribution.errors import GlueError


def test_metrics_known_answer():
    flipped = np.zeros(100, dtype=bool)
    flipped[:10] = True
    perfect = -np.arange(100.0)  # the flips first
    assert detection.detection_metrics(perfect, flipped) == pytest.approx(
        {"roc_auc": 1.0, "average_precision": 1.0, "found@5%": 0.5, "found@10%": 1.0, "found@20%": 1.0})
    worst = detection.detection_metrics(-perfect, flipped)
    assert worst["roc_auc"] == 0.0 and worst["found@20%"] == 0.0
    middle = np.where(flipped, 0.0, 1.0)  # the flips below 40 clean examples and above the other 50
    middle[50:] = -1.0
    assert detection.detection_metrics(middle, flipped)["roc_auc"] == pytest.approx(50 / 90)
    curve = detection.found_curve(perfect, flipped)
    assert curve[9] == 1.0 and curve[4] == 0.5 and len(curve) == 100
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    suspicion = detection.cleanlab_suspicion(labels, probabilities)
    assert np.argsort(-suspicion).tolist()[:2] == [1, 2]  # the two confident disagreements


def test_area_under_the_margin_known_answer():
    """A memorised flip: its margin ends as high as a clean example's (so the final loss cannot tell them apart),
    but its margin averaged over training is low; NaN epochs (a dropped last batch) are skipped."""
    margins_seen = np.array([[2.0, -3.0, 1.5, np.nan],
                             [3.0, -1.0, 2.5, 2.0],
                             [4.0, 4.0, 3.0, 3.0]])
    suspicion = detection.aum_suspicion(margins_seen)
    assert suspicion == pytest.approx([-3.0, 0.0, -7 / 3, -2.5])
    assert np.argsort(-suspicion)[0] == 1 and np.argsort(margins_seen[-1], kind="stable")[0] != 1


def test_held_out_harm_known_answer():
    """Example 2 lowers every query's margin: most harmful. Query 0's scores are 1000x larger and blame example 0;
    standardised per query, it counts as one query of three, so example 0 stays below example 2."""
    pairwise = np.array([[-1000.0, 0.0, -900.0, 1000.0],
                         [0.5, 1.0, -2.0, 0.5],
                         [1.0, 0.5, -2.0, 0.5]])
    harm = detection.held_out_harm(pairwise)
    assert np.argsort(-harm).tolist()[:2] == [2, 0]
    assert harm == pytest.approx(-(pairwise / pairwise.std(axis=1, keepdims=True)).sum(axis=0))
    assert np.argsort(pairwise.sum(axis=0))[0] == 0  # the raw sum would blame example 0


def test_removals_drop_each_rankings_top():
    suspicion = {"a": np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.0, 0.3, 0.4, 0.6, 0.7])}
    runs = cleaning.removals(suspicion, [0.1, 0.3])
    assert list(runs) == ["noisy", "clean", "a@10%", "a@30%"]
    assert runs["noisy"].size == 0 and runs["a@10%"].tolist() == [1] and runs["a@30%"].tolist() == [1, 4, 9]


def test_experiment_end_to_end(tiny_model_dir, glue_dir, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "influence_results"
    trained = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path",
                         tiny_model_dir, "--max_seq_length", "32", "--num_train_epochs", "2", "--train_batch_size",
                         "8", "--learning_rate", "1e-3", "--label_noise", "0.25", "--checkpoint_dir", str(checkpoints),
                         "--save_epoch_checkpoints")
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((checkpoints / "rte" / "glue_checkpoint.json").read_text())
    assert "epoch1/model.safetensors" in meta["files"]  # the epoch is verified with the checkpoint
    assert json.loads((checkpoints / "rte" / "epoch1" / "glue_checkpoint.json").read_text())["epoch"] == 1
    own = ["--dataset_name", "rte", "--checkpoint_dir", str(checkpoints), "--output_dir", str(out)]
    assert_user_error(run_script("detect_mislabeled.py", *own, "--strategies", "identity"), "no finished scores")
    analyze = ["analyze.py", *own, "--train_batch_size", "16", "--factor_strategy", "identity", "--compute_self_scores"]
    assert_user_error(run_script(*analyze, "--checkpoint_epoch", "2"), "no epoch2/", "--save_epoch_checkpoints")
    for extra in (["--max_query_examples", "4"], ["--max_query_examples", "1", "--checkpoint_epoch", "1"]):
        analyzed = run_script(*analyze, *extra)
        assert analyzed.returncode == 0, analyzed.stderr
    detect = ["detect_mislabeled.py", *own, "--strategies", "identity", "--num_folds", "2", "--detection_dir",
              str(tmp_path / "detection"), "--fix_fractions", "0.1", "--fix_rankings", "identity_harm",
              "identity_trajectory", "random"]
    assert_user_error(run_script(*detect[:-3], "identity_trajectroy"),
                      "--fix_rankings identity_trajectroy: no such ranking", "identity_trajectory")
    assert not (tmp_path / "detection").exists()  # refused before any fold trained
    shard = run_script(*detect, "--num_shards", "2", "--shard_index", "1")  # its share, then waits for the other
    assert shard.returncode == 0, shard.stderr
    fix = tmp_path / "detection" / "runs" / "fix"
    assert sorted(p.name for p in fix.glob("*.npz")) == ["clean.npz", "identity_trajectory@10%.npz"]
    assert not (tmp_path / "detection" / "detection_results.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in fix.glob("*.npz")}
    killed = run_script(*detect, GLUE_KILL_AT="fix_retrained:2")
    assert killed.returncode == -9 and len(list(fix.glob("*.npz"))) == 4
    result = run_script(*detect)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in fix.glob("*.npz") if p.name in before} == before  # not redone
    results = json.loads((tmp_path / "detection" / "detection_results.json").read_text())
    assert results["num_train"] == 48 and results["num_flipped"] == 12
    names = ["identity", "identity_epoch1", "identity_trajectory", "identity_harm", "loss", "aum", "cleanlab",
             "random"]
    assert list(results["results"]) == names and list(results["cost"]) == names
    assert results["cost"]["cleanlab"]["retrains"] == 2 and results["cost"]["cleanlab"]["seconds"] > 0
    assert all(0 <= row["roc_auc"] <= 1 and 0 <= row["found@20%"] <= 1 for row in results["results"].values())
    fixed = results["fix_and_retrain"]
    assert fixed["num_judged"] == 12 and list(fixed["rankings"]) == ["identity_harm", "identity_trajectory", "random"]
    assert all(0 <= fixed[m] <= 1 for m in ("noisy", "clean"))
    assert results["results"]["random"]["fixed@10%"] == fixed["rankings"]["random"]["fixed@10%"]
    stale = fix / "random@10%.npz"  # a ranking that changed since its retrain: the run is redone, not reused
    with np.load(stale) as run:
        removed = run["removed"]
        np.savez(stale, **{**{k: run[k] for k in run.files}, "removed": (removed + 1) % 48})
    redone = run_script(*detect)
    assert redone.returncode == 0 and "Redoing random@10%" in redone.stderr, redone.stderr
    with np.load(stale) as run:
        assert run["removed"].tolist() == removed.tolist()
    assert "fixed@10%" not in results["results"]["loss"]
    assert (tmp_path / "detection" / "detection.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "detection" / "runs").glob("*.npz")) == ["fold0.npz", "fold1.npz"]
    rows = (tmp_path / "detection" / "detection_rankings.csv").read_text().splitlines()
    assert len(rows) == 49 and rows[0] == "index,flipped,label," + ",".join(names)
    columns = np.array([[float(v) for v in r.split(",")[3:]] for r in rows[1:]])
    final, epoch1 = (scores.load_scores(str(out), "rte", name, kind="self")[0]
                     for name in ("identity", "identity_epoch1"))
    shutil.copytree(out / "rte" / "scores_identity_epoch1", out / "rte" / "scores_identityx")  # epoch 1, misnamed
    with pytest.raises(GlueError, match="not the final checkpoint"):
        scores.load_scores(str(out), "rte", "identityx", checkpoints=trained_checkpoints(str(checkpoints), "rte"))
    assert_user_error(run_script(*analyze, "--scores_name", "mine_epoch1"), "--scores_name mine_epoch1")
    assert columns[:, 2] == pytest.approx(ensembles.combine([epoch1, final]), rel=1e-4, abs=1e-5)
    assert "ROC AUC" in result.stdout and "clean-label model" in result.stdout
    page = explorer.read_data(str(out / "rte" / "scores_identity" / "explorer.html"))  # flags beside candidates
    assert page["detection"]["rankings"] == names and len(page["harm"]) == 48
    assert page["harm"][0]["index"] == int(np.argmax(columns[:, 3]))  # the page's harm list is the ranking's
    flips = {int(r.split(",")[0]) for r in rows[1:] if r.split(",")[1] == "1"}
    assert {int(j) for j, e in page["detection"]["examples"].items() if e["flipped"]} == flips
    assert page["detection"]["flag_rank"] == round(0.1 * 48)
    path = str(tmp_path / "detection" / "detection_results.json")
    summary = run_script("detect_mislabeled.py", "--summarize", path, path)
    assert summary.returncode == 0 and "2 runs: mean ± sd" in summary.stdout
    assert "fixed@10%" in summary.stdout.splitlines()[1]  # although the first ranking was not cleaned with
    identity = results["results"]["identity"]["roc_auc"]
    row = next(line for line in summary.stdout.splitlines() if line.startswith("identity "))
    assert f"{identity:.3f} ± 0.000" in row
    assert f"{fixed['noisy']:.3f} ± 0.000" in next(line for line in summary.stdout.splitlines()
                                                   if line.startswith("noisy model"))
    clean = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path",
                       tiny_model_dir, "--max_seq_length", "32", "--num_train_epochs", "1", "--train_batch_size", "8",
                       "--checkpoint_dir", str(tmp_path / "clean"))
    assert clean.returncode == 0
    refused = run_script("detect_mislabeled.py", "--dataset_name", "rte", "--checkpoint_dir", str(tmp_path / "clean"))
    assert_user_error(refused, "trained without --label_noise", "train one with flipped labels: python train.py")
    command = shlex.split(refused.stderr.strip().splitlines()[-1].split("flipped labels: ")[1])
    assert command[command.index("--label_noise") + 1] == "0.1" and "--data_dir" in command
    assert run_script(*command[1:]).returncode == 0  # the command works as printed: the same data, now noisy
    noisy = json.loads((tmp_path / "clean" / "noise0.1" / "rte" / "glue_checkpoint.json").read_text())["args"]
    assert noisy["label_noise"] == 0.1 and noisy["max_seq_length"] == 32 and noisy["num_train_epochs"] == 1
