"""benchmarks/gpu_checks.py --dry_run: every GPU step runs on CPU at tiny shapes, under one budget, and writes its
numbers, so the script is known to work before it runs on a GPU. The driver runs in this process (its own imports are
paid once); the scripts it calls run as subprocesses, as on the GPU."""

import json
import re
import sys
import time

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_checks  # noqa: E402

STAGES = {"covariance", "eigendecomposition", "lambda", "scores", "factors", "total"}


def dry_run(glue_dir, tokenizer: str, tmp_path, *flags: str) -> tuple:
    out = tmp_path / "out"
    status = gpu_checks.main(["--dry_run", "--out", str(out), "--data_dir", str(glue_dir), "--tokenizer", tokenizer,
                              "--work_dir", str(tmp_path / "work"), *flags])
    return status, json.loads((out / "gpu_checks.json").read_text()), out


def test_all_steps_in_one_run(glue_dir, tiny_model_dir, tmp_path):
    status, summary, out = dry_run(glue_dir, tiny_model_dir, tmp_path, "--budget_s", "3600")
    assert status == 0 and summary["steps"] == {str(step): "done" for step in (1, 2, 3, 4)}, summary
    numbers = {step: json.loads((out / f"step{step}.json").read_text()) for step in (1, 2, 3, 4)}
    for found in numbers.values():
        assert found["status"] == "done" and found["dry_run"] and found["wall_s"] > 0

    # 1: seed recipe vs project path in TF32 and bf16 (plain fp32 only with --step 1 alone), the index, both stores
    assert numbers[1]["fp32"] == {"skipped": "run with --step 1 alone"}
    for precision, recipes in (("tf32", {"seed", "project"}), ("bf16", {"seed", "project"})):
        report = json.loads((out / f"step1_{precision}.json").read_text())
        assert report["precision"] == precision and report["factor_batch_size"] == 8
        for recipe in recipes:
            assert set(report[recipe]) == STAGES and set(numbers[1][precision][recipe]) == STAGES
            assert set(report[f"{recipe}_whole_sst2_s"]) == STAGES - {"factors"}
        assert ("spearman" in report) == (len(recipes) == 2)
    index = numbers[1]["index_float32"]
    assert {"covariance", "eigendecomposition", "index_build", "index_merge", "scores"} <= set(index["seconds"])
    assert index["whole_sst2_s"]["index_build"] == pytest.approx(index["seconds"]["index_build"] * 67349 / 16)
    assert index["whole_sst2_s"]["scores"] == pytest.approx(index["seconds"]["scores"] * 872 / 4)
    assert index["whole_sst2_s"]["eigendecomposition"] == index["seconds"]["eigendecomposition"]
    half = numbers[1]["index_float16"]
    assert set(half["seconds"]) == {"index_build", "index_merge", "scores"}
    assert half["index_bytes"] < index["index_bytes"]

    # 2: trained, indexed (explorer page), exact on a slice and, budget allowing, on all queries
    sst2 = numbers[2]
    assert sst2["model"] == "tiny (dry run)" and 0 <= sst2["dev_accuracy"] <= 1 and sst2["train_s"] > 0
    assert sst2["index"]["shape"] == [8, 32] and sst2["index"]["seconds"]["index_build"] > 0
    assert (out / "step2_explorer.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert sst2["exact_slice"]["queries"] == 4 and sst2["exact"]["shape"] == [8, 32]
    slice_seconds = sst2["exact_slice"]["seconds"]
    assert sst2["exact_slice"]["all_queries_estimate_s"] == pytest.approx(
        slice_seconds["covariance"] + slice_seconds["eigendecomposition"] + slice_seconds["lambda"]
        + 2 * slice_seconds["scores"])
    assert -1 <= sst2["index_vs_exact_spearman"] <= 1

    # 3: DDP (here: a second single process) against single-process scores
    assert numbers[3]["shape"] == [8, 32] and numbers[3]["match"] and numbers[3]["max_abs_diff"] == 0
    assert {"train_s", "single_s", "ddp_s", "spearman"} <= set(numbers[3])

    # 4: LDS retrain throughput
    for name, processes in (("fp32_x1", 1), ("bf16_x2", 2)):
        assert numbers[4][name]["processes"] == processes and numbers[4][name]["retrains_done"] >= 2 * processes
        assert numbers[4][name]["retrains_per_hour"] > 0 and numbers[4][name]["seconds_per_retrain"] > 0
    assert numbers[4]["vs_fp32_x1"]["fp32_x1"] == 1


def test_spent_budget_skips_the_steps(glue_dir, tiny_model_dir, tmp_path):
    start = time.time()
    status, summary, out = dry_run(glue_dir, tiny_model_dir, tmp_path, "--budget_s", "0")
    assert status == 0 and summary["steps"] == {str(step): "skipped: budget" for step in (1, 2, 3, 4)}
    assert json.loads((out / "step2.json").read_text())["status"] == "skipped: budget"
    assert time.time() - start < 10 and not (tmp_path / "work").exists()  # nothing ran


def fake_steps(monkeypatch, seconds: float) -> list:
    """Steps that take `seconds` and write one number each: the driver's budget and --step without the work."""
    ran = []

    def step(args, numbers, deadline, work):
        ran.append(numbers["step"])
        time.sleep(seconds)
        numbers["measured"] = numbers["step"] * 10

    monkeypatch.setattr(gpu_checks, "STEPS", {step_number: step for step_number in (1, 2, 3, 4)})
    return ran


def test_one_step_alone(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    ran = fake_steps(monkeypatch, 0)
    status, summary, out = dry_run(glue_dir, tiny_model_dir, tmp_path, "--step", "3")
    assert status == 0 and ran == [3] and summary["steps"] == {"3": "done"}
    assert json.loads((out / "step3.json").read_text())["measured"] == 30
    assert sorted(path.name for path in out.iterdir()) == ["gpu_checks.json", "step3.json"]


def test_a_step_spending_the_budget_leaves_the_next_skipped(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    ran = fake_steps(monkeypatch, 1.5)
    status, summary, out = dry_run(glue_dir, tiny_model_dir, tmp_path, "--budget_s", "1")
    assert status == 0 and ran == [1]
    assert summary["steps"] == {"1": "done", **{str(step): "skipped: budget" for step in (2, 3, 4)}}
    assert json.loads((out / "step1.json").read_text())["measured"] == 10  # its numbers kept


def test_a_step_stopped_at_the_budget_keeps_its_numbers(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(60)\n")

    def step(args, numbers, deadline, work):
        numbers["first"] = 1.0
        gpu_checks.run_timed([sys.executable, str(script)], deadline)
        numbers["second"] = 2.0

    monkeypatch.setattr(gpu_checks, "STEPS", {1: step})
    start = time.time()
    status, summary, out = dry_run(glue_dir, tiny_model_dir, tmp_path, "--budget_s", "1")
    numbers = json.loads((out / "step1.json").read_text())
    assert status == 0 and summary["steps"]["1"].startswith("stopped: ")
    assert re.search(r"sleeps\.py stopped at the budget after \d+ s$", summary["steps"]["1"])
    assert numbers["first"] == 1.0 and "second" not in numbers and time.time() - start < 15


def test_a_script_is_stopped_at_the_deadline(tmp_path):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(60)\n")
    start = time.time()
    with pytest.raises(gpu_checks.BudgetSpent, match="stopped at the budget"):
        gpu_checks.run_timed([sys.executable, str(script)], deadline=time.time() + 1)
    assert time.time() - start < 15
    with pytest.raises(gpu_checks.BudgetSpent, match="budget spent before"):
        gpu_checks.run_timed([sys.executable, str(script)], deadline=time.time() - 1)


def test_carried_model_is_float16_and_loads_as_float32(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    carried = gpu_checks.copy_model(tiny_model_dir, str(tmp_path / "carried"), torch.float16)
    assert {v.dtype for v in load_file(f"{carried}/model.safetensors").values() if v.is_floating_point()} == {
        torch.float16}
    widened = gpu_checks.widen_model(carried, str(tmp_path / "widened"))
    model, original = AutoModel.from_pretrained(widened), AutoModel.from_pretrained(tiny_model_dir)
    for (name, param), (_, reference) in zip(model.named_parameters(), original.named_parameters()):
        assert param.dtype == torch.float32
        assert torch.equal(param, reference.half().float()), name


def test_refuses_without_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_checks.main(["--step", "1", "--out", str(tmp_path)]) == 2
    assert "--dry_run" in capsys.readouterr().err
