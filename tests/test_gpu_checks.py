"""benchmarks/gpu_checks.py --dry_run: every GPU step runs on CPU at tiny shapes and writes its numbers, so the script
is known to work before it runs on a GPU. The driver runs in this process (its own imports are paid once); the
scripts it calls run as subprocesses, as on the GPU."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_checks  # noqa: E402

STAGES = {"covariance", "eigendecomposition", "lambda", "scores", "factors", "total"}


def dry_run(step: int, glue_dir, tokenizer: str, tmp_path) -> dict:
    out = tmp_path / "out"
    status = gpu_checks.main(["--step", str(step), "--dry_run", "--out", str(out), "--data_dir", str(glue_dir),
                              "--tokenizer", tokenizer, "--work_dir", str(tmp_path / "work")])
    numbers = json.loads((out / f"step{step}.json").read_text())
    assert status == 0 and numbers["status"] == "done", numbers
    assert numbers["dry_run"] and numbers["wall_s"] > 0
    return numbers


def test_step1_bench(glue_dir, tiny_model_dir, tmp_path):
    numbers = dry_run(1, glue_dir, tiny_model_dir, tmp_path)
    for precision, recipes in (("tf32", {"seed", "project"}), ("bf16", {"seed", "project"}), ("fp32", {"project"})):
        report = json.loads((tmp_path / "out" / f"step1_{precision}.json").read_text())
        assert report["precision"] == precision and report["factor_batch_size"] == 8
        for recipe in recipes:
            assert set(report[recipe]) == STAGES and set(numbers[precision][recipe]) == STAGES
            assert set(report[f"{recipe}_whole_sst2_s"]) == STAGES - {"factors"}
        assert ("spearman" in report) == (len(recipes) == 2)


def test_step2_ddp_matches_single_process(glue_dir, tiny_model_dir, tmp_path):
    numbers = dry_run(2, glue_dir, tiny_model_dir, tmp_path)
    assert numbers["shape"] == [8, 32] and numbers["match"] and numbers["max_abs_diff"] == 0
    assert {"train_s", "single_s", "ddp_s", "spearman"} <= set(numbers)


def test_step3_retrain_throughput(glue_dir, tiny_model_dir, tmp_path):
    numbers = dry_run(3, glue_dir, tiny_model_dir, tmp_path)
    for name, processes in (("fp32_x1", 1), ("bf16_x2", 2)):
        assert numbers[name]["processes"] == processes and numbers[name]["retrains_done"] >= 2 * processes
        assert numbers[name]["retrains_per_hour"] > 0 and numbers[name]["seconds_per_retrain"] > 0
    assert numbers["vs_fp32_x1"]["fp32_x1"] == 1


def test_refuses_without_gpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_checks.main(["--step", "1", "--out", str(tmp_path)]) == 2
    assert "--dry_run" in capsys.readouterr().err
