"""detect_mislabeled.py: the detection metrics on a constructed case with a known answer, and the whole
experiment on a tiny model (noisy checkpoint, self-influence, loss, cleanlab cross-validation, random)."""

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_script
from glue_attribution import detection, explorer


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


def test_experiment_end_to_end(tiny_model_dir, glue_dir, tmp_path):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "influence_results"
    trained = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path",
                         tiny_model_dir, "--max_seq_length", "32", "--num_train_epochs", "1", "--train_batch_size",
                         "8", "--learning_rate", "1e-3", "--label_noise", "0.25", "--checkpoint_dir", str(checkpoints))
    assert trained.returncode == 0, trained.stderr
    own = ["--dataset_name", "rte", "--checkpoint_dir", str(checkpoints), "--output_dir", str(out)]
    assert_user_error(run_script("detect_mislabeled.py", *own, "--strategies", "identity"), "no finished scores")
    analyzed = run_script("analyze.py", *own, "--max_query_examples", "2", "--train_batch_size", "16",
                          "--factor_strategy", "identity", "--compute_self_scores")
    assert analyzed.returncode == 0, analyzed.stderr
    result = run_script("detect_mislabeled.py", *own, "--strategies", "identity", "--num_folds", "2",
                        "--detection_dir", str(tmp_path / "detection"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "detection" / "detection_results.json").read_text())
    assert results["num_train"] == 48 and results["num_flipped"] == 12
    assert list(results["results"]) == ["identity", "loss", "aum", "cleanlab", "random"]
    assert all(0 <= row["roc_auc"] <= 1 and 0 <= row["found@20%"] <= 1 for row in results["results"].values())
    assert (tmp_path / "detection" / "detection.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "detection" / "runs").glob("*.npz")) == ["fold0.npz", "fold1.npz"]
    rows = (tmp_path / "detection" / "detection_rankings.csv").read_text().splitlines()
    assert len(rows) == 49 and rows[0] == "index,flipped,label,identity,loss,aum,cleanlab,random"
    assert "ROC AUC" in result.stdout
    page = explorer.read_data(str(out / "rte" / "scores_identity" / "explorer.html"))  # flags beside candidates
    assert page["detection"]["rankings"] == ["identity", "loss", "aum", "cleanlab", "random"]
    flips = {int(r.split(",")[0]) for r in rows[1:] if r.split(",")[1] == "1"}
    assert {int(j) for j, e in page["detection"]["examples"].items() if e["flipped"]} == flips & {
        e["index"] for e in page["self_influence"]}
    assert page["detection"]["flag_rank"] == round(0.1 * 48)
    path = str(tmp_path / "detection" / "detection_results.json")
    summary = run_script("detect_mislabeled.py", "--summarize", path, path)
    assert summary.returncode == 0 and "2 runs: mean ± sd" in summary.stdout
    identity = results["results"]["identity"]["roc_auc"]
    row = next(line for line in summary.stdout.splitlines() if line.startswith("identity"))
    assert f"{identity:.3f} ± 0.000" in row
    clean = run_script("train.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path",
                       tiny_model_dir, "--max_seq_length", "32", "--num_train_epochs", "1", "--train_batch_size", "8",
                       "--checkpoint_dir", str(tmp_path / "clean"))
    assert clean.returncode == 0
    assert_user_error(run_script("detect_mislabeled.py", "--dataset_name", "rte", "--checkpoint_dir",
                                 str(tmp_path / "clean")), "train.py --label_noise")
