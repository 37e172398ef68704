"""task.py on toy batches, and analyze.py end to end on a tiny random BERT: every strategy, exact dynamic padding,
resume, dataset order, inspection and bad input."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from kronfluence.arguments import FactorArguments
from safetensors.torch import load_file

import analyze
from conftest import assert_user_error, run_script
from glue_attribution import influence, pipeline, results
from glue_attribution.checkpoints import load_checkpoint, save_checkpoint
from glue_attribution.errors import GlueError
from glue_attribution.scores import load_scores
from glue_attribution.task import GlueTask

N_TRAIN, N_QUERY = 24, 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir, glue_dir):
    """A tiny RTE checkpoint trained with the shared recipe, saved as train.py saves it."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = pipeline.load_tokenizer(tiny_model_dir)
    data = pipeline.tokenize(pipeline.load_glue("rte", "train", str(glue_dir), N_TRAIN), "rte", tokenizer, 32)
    config = pipeline.TrainConfig(learning_rate=1e-3, train_batch_size=8, num_train_epochs=1)
    model = pipeline.finetune(tiny_model_dir, "rte", data, pipeline.collator(tokenizer), config, 0, disable_tqdm=True)
    save_checkpoint(model, tokenizer, str(root / "rte"), {"task": "rte", "num_labels": 2})
    return root


def run_analyze(monkeypatch, glue_dir, checkpoints, output_dir, *extra):
    argv = ["analyze.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--checkpoint_dir", str(checkpoints),
            "--output_dir", str(output_dir), "--max_train_samples", str(N_TRAIN), "--max_query_examples",
            str(N_QUERY), "--max_seq_length", "32", "--query_batch_size", "4", "--train_batch_size", "8", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    analyze.main()


def scores_of(output_dir, name):
    return load_scores(str(output_dir), "rte", name)[0]


def test_task_losses_and_measurement():
    task = GlueTask()

    class Toy(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})()

    batch = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.tensor([0, 2])}
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    assert torch.isclose(task.compute_train_loss(batch, Toy(logits)), expected)
    torch.manual_seed(0)
    assert torch.isfinite(task.compute_train_loss(batch, Toy(logits), sample=True))
    assert torch.isclose(task.compute_measurement(batch, Toy(logits)), -pipeline.margins(logits, batch["labels"]).sum())
    assert task.get_attention_mask(batch) is batch["attention_mask"]
    regression = {**batch, "labels": torch.tensor([1.0, 2.0])}
    predictions = torch.tensor([[0.5], [2.5]])
    assert torch.isclose(task.compute_train_loss(regression, Toy(predictions)), torch.tensor(0.5))
    assert torch.isclose(task.compute_measurement(regression, Toy(predictions)), torch.tensor(-3.0))


@pytest.mark.parametrize("strategy", [s for s in analyze.STRATEGIES if s != "trak"])
def test_dynamic_padding_is_exact(monkeypatch, glue_dir, checkpoints, tmp_path, strategy):
    """Length-sorted, per-batch padding gives the scores of padding to max length, in dataset order. (The empirical
    Fisher removes the only other difference: which sampled label each example draws. TRAK's per-example gradients
    are checked against unpadded ones in test_ensembles.py: its float32 Gram inverse is meaningless on a tiny model.)"""
    exact = ["--factor_strategy", strategy, "--float64", "--attn_implementation", "eager", "--use_empirical_fisher"]
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / "dynamic", *exact)
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / "padded", *exact, "--pad_to_max_length")
    name = f"{strategy}_k16" if strategy.endswith("_index") else strategy  # the gradient index: k=16 by default
    dynamic, padded = scores_of(tmp_path / "dynamic", name), scores_of(tmp_path / "padded", name)
    assert dynamic.shape == (N_QUERY, N_TRAIN) and np.isfinite(dynamic).all()
    assert np.abs(dynamic - padded).max() <= 1e-8 * np.abs(padded).max()


def test_stock_and_token_factored_trackers_agree(monkeypatch, glue_dir, checkpoints, tmp_path):
    exact = ["--float64", "--attn_implementation", "eager", "--compute_self_scores", "--use_empirical_fisher"]
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / "fast", *exact)
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / "stock", *exact, "--stock_kronfluence")
    np.testing.assert_allclose(scores_of(tmp_path / "fast", "ekfac"), scores_of(tmp_path / "stock", "ekfac"),
                               rtol=1e-8, atol=1e-10 * np.abs(scores_of(tmp_path / "stock", "ekfac")).max())
    self_scores = [load_file(tmp_path / run / "rte" / "scores_ekfac" / "self_scores.safetensors")["all_modules"]
                   for run in ("fast", "stock")]
    assert self_scores[0].shape == (N_TRAIN,)
    torch.testing.assert_close(self_scores[0], self_scores[1], rtol=1e-8, atol=0)


def test_half_precision_query_rank_and_tracked_modules(monkeypatch, glue_dir, checkpoints, tmp_path):
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--use_half_precision", "--query_gradient_rank", "2",
                "--tracked_modules", "*.output.dense", "--factor_strategy", "kfac")
    scores = scores_of(tmp_path, "kfac_half_qlr2")
    assert scores.shape == (N_QUERY, N_TRAIN) and np.isfinite(scores).all()
    meta = json.loads((tmp_path / "rte" / "scores_kfac_half_qlr2" / "glue_scores.json").read_text())
    assert meta["signature"]["tracked_modules"] == ["*.output.dense"] and meta["order"] == "dataset"


def test_rerun_reuses_and_a_damaged_stage_alone_is_refit(monkeypatch, glue_dir, checkpoints, tmp_path):
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path)
    factors = tmp_path / "rte" / "factors_ekfac"
    scores_file = tmp_path / "rte" / "scores_ekfac" / "pairwise_scores.safetensors"
    mtimes = {p.name: p.stat().st_mtime_ns for p in [*factors.glob("*.safetensors"), scores_file]}
    first = scores_of(tmp_path, "ekfac")
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path)  # finished: nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in [*factors.glob("*.safetensors"), scores_file]} == mtimes

    # Truncated Lambda and scores: the owner refits Lambda only (covariance and eigenvectors are kept, verified),
    # recomputes the scores, and gets exactly the uninterrupted result.
    lambda_file = factors / "lambda_matrix.safetensors"
    for path in (lambda_file, scores_file):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path)
    covariance = "activation_covariance.safetensors"
    assert (factors / covariance).stat().st_mtime_ns == mtimes[covariance]
    assert lambda_file.stat().st_mtime_ns != mtimes[lambda_file.name]
    np.testing.assert_array_equal(scores_of(tmp_path, "ekfac"), first)
    assert not list((tmp_path / "rte" / ".staging").glob("*-*"))  # private folders are gone once published


def test_inspect_query(monkeypatch, glue_dir, checkpoints, tmp_path, capsys):
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity", "--inspect_query", "1",
                "--top_k", "2", "--scores_name", "tracin")
    out = capsys.readouterr().out
    scores = scores_of(tmp_path, "tracin")
    top = int(np.argmax(scores[1]))
    train = pipeline.load_glue("rte", "train", str(glue_dir), N_TRAIN)
    assert "Query 1:" in out and f"[train {top}]" in out and train[top]["sentence1"] in out
    assert out.count("[train ") == 4
    # the model's answer (two classes: wrong exactly when the margin is negative) and the explorer opened on it
    prediction, margin, verdict = re.search(r"prediction: (\w+) \(margin (-?[\d.]+): (right|WRONG)\)", out).groups()
    assert prediction in ("entailment", "not_entailment") and (float(margin) < 0) == (verdict == "WRONG")
    page = (tmp_path / "rte" / "scores_tracin" / "explorer.html").resolve()
    assert f"This query in the explorer: {page.as_uri()}#query=1\n" in out


def test_bad_input(monkeypatch, glue_dir, checkpoints, tmp_path):
    def fails(*extra, match):
        with pytest.raises(GlueError, match=match):
            run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, *extra)

    fails("--inspect_query", str(N_QUERY), match="out of range: there are 6 queries")
    fails("--tracked_modules", "nothing*", match="matches no nn.Linear")
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "diagonal")
    fails("--factor_strategy", "diagonal", "--damping_factor", "1e-3", match="other arguments .*score_args")
    shutil.copytree(checkpoints / "rte", tmp_path / "other" / "mnli")
    with pytest.raises(GlueError, match="trained for 'rte' with 2 labels, not 'mnli' with 3"):
        monkeypatch.setattr(sys, "argv", ["analyze.py", "--dataset_name", "mnli", "--checkpoint_dir",
                                          str(tmp_path / "other")])
        analyze.main()


def test_analyze_script_bad_input(checkpoints, tmp_path):
    common = ["--dataset_name", "rte", "--checkpoint_dir", str(checkpoints)]
    assert_user_error(run_script("analyze.py", *common, "--factor_strategy", "foo"), "unknown --factor_strategy")
    assert_user_error(run_script("analyze.py", *common, "--query_gradient_rank", "0"),
                      "--query_gradient_rank: expected a positive integer, got 0")
    assert_user_error(run_script("analyze.py", "--dataset_name", "rte", "--checkpoint_dir", str(tmp_path)),
                      "no checkpoint at", "train it first: python train.py --dataset_name rte --checkpoint_dir")
    assert_user_error(run_script("analyze.py", *common, "--data_dir", "x"), "RTE/train.tsv")
    if not torch.cuda.is_available():  # a CPU torchrun launch would fit unsynchronised (wrong) factors
        assert_user_error(run_script("analyze.py", *common, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                          "torchrun without CUDA")


# ----------------------------------------------------------------------------------------------------------------------
# Kills, reruns and a second process never serve wrong scores (results.py)

def analyze_argv(glue_dir, checkpoints, output_dir, *extra) -> list:
    return ["--dataset_name", "rte", "--data_dir", str(glue_dir), "--checkpoint_dir", str(checkpoints),
            "--output_dir", str(output_dir), "--max_train_samples", str(N_TRAIN), "--max_query_examples",
            str(N_QUERY), "--max_seq_length", "32", "--query_batch_size", "4", "--train_batch_size", "8", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, glue_dir, checkpoints):
    """Uninterrupted ekfac and identity scores, one process."""
    output_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for strategy in ("ekfac", "identity"):
            run_analyze(monkeypatch, glue_dir, checkpoints, output_dir, "--factor_strategy", strategy)
    return {"output_dir": output_dir, **{name: scores_of(output_dir, name) for name in ("ekfac", "identity")}}


@pytest.mark.parametrize("step", ["after_covariance", "after_eigendecomposition", "scores_saved", "before_publish:2"])
def test_killed_run_resumes_to_the_uninterrupted_scores(monkeypatch, glue_dir, checkpoints, reference, tmp_path, step):
    """SIGKILL at a named step (between factor stages; between kronfluence's save and publishing; after sealing,
    before the rename): nothing is published half-done, and the rerun's scores equal an uninterrupted run's."""
    killed = run_script("analyze.py", *analyze_argv(glue_dir, checkpoints, tmp_path), GLUE_KILL_AT=step)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "rte" / "scores_ekfac").exists()
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path)
    np.testing.assert_array_equal(scores_of(tmp_path, "ekfac"), reference["ekfac"])


@pytest.mark.parametrize("stop, status, line", [
    ({"GLUE_KILL_AT": "before_lambda", "GLUE_KILL_SIGNAL": "INT"}, 130,
     "interrupted during fitting factors (lambda); rerun the same command to resume from there"),
    ({"GLUE_KILL_AT": "before_lambda", "GLUE_KILL_SIGNAL": "TERM"}, 143,
     "terminated (SIGTERM) during fitting factors (lambda); rerun the same command to resume from there"),
    ({"GLUE_FAIL_AT": "before_lambda"}, 1, "error: no space left on device in "),
])
def test_ctrl_c_sigterm_and_full_disk_end_in_one_line_and_resume(monkeypatch, glue_dir, checkpoints, reference,
                                                                  tmp_path, stop, status, line):
    """Ctrl-C, SIGTERM (kill, SLURM, timeout) and a full disk (an injected ENOSPC) end with their conventional exit
    status and one line, no traceback; the rerun resumes after the finished stages to the uninterrupted scores."""
    stopped = run_script("analyze.py", *analyze_argv(glue_dir, checkpoints, tmp_path), **stop)
    assert stopped.returncode == status, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(line), last
    if status == 1:
        assert "MB free) during fitting factors (lambda); free some space" in last and "rerun the same command" in last
    assert not (tmp_path / "rte" / "scores_ekfac").exists()
    rerun = run_script("analyze.py", *analyze_argv(glue_dir, checkpoints, tmp_path))
    assert "Resuming factors after the covariance, eigendecomposition stage(s)" in rerun.stderr, rerun.stderr[-2000:]
    np.testing.assert_array_equal(scores_of(tmp_path, "ekfac"), reference["ekfac"])


def test_factors_that_cannot_fit_are_refused_before_fitting(monkeypatch, glue_dir, checkpoints, reference, tmp_path):
    """The factors' size follows from the tracked modules: it matches what kronfluence writes, and a disk with less
    free space is refused before the first stage, naming both numbers."""
    model, _, _ = load_checkpoint(str(checkpoints / "rte"), "rte")
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        estimate = influence.factor_bytes(model, None, FactorArguments(strategy=strategy))
        if strategy == "ekfac":
            written = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in
                          os.walk(reference["output_dir"] / "rte" / "factors_ekfac") for name in names
                          if name.endswith(".safetensors"))
            assert written <= estimate <= 1.1 * written, (estimate, written)
        assert (estimate == 0) == (strategy == "identity")
    monkeypatch.setattr(results, "free_bytes", lambda path: 1000)
    with pytest.raises(GlueError, match=r"no space left in .*: 0 MB needed for the factors, 0 MB free"):
        run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path)
    assert not (tmp_path / "rte" / "factors_ekfac").exists()


def test_interrupted_overwrite_never_serves_stale_factors(monkeypatch, glue_dir, checkpoints, tiny_model_dir,
                                                          reference, tmp_path):
    """Factors of checkpoint A; analysing checkpoint B is refused; B with --overwrite killed mid-fit leaves A's
    results published and B still refused; B with --overwrite then equals a clean B run."""
    other = tmp_path / "checkpoint_b"
    model, tokenizer, meta = load_checkpoint(str(checkpoints / "rte"), "rte")
    torch.manual_seed(1)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    save_checkpoint(model, tokenizer, str(other / "rte"), {"task": "rte", "num_labels": 2})
    out = tmp_path / "out"
    run_analyze(monkeypatch, glue_dir, checkpoints, out)
    with pytest.raises(GlueError, match=r"other arguments \(checkpoint_sha256 differ\).*--overwrite"):
        run_analyze(monkeypatch, glue_dir, other, out)
    killed = run_script("analyze.py", *analyze_argv(glue_dir, other, out, "--overwrite"),
                        GLUE_KILL_AT="after_covariance")
    assert killed.returncode == -9
    with pytest.raises(GlueError, match="checkpoint_sha256 differ"):
        run_analyze(monkeypatch, glue_dir, other, out)
    np.testing.assert_array_equal(scores_of(out, "ekfac"), reference["ekfac"])  # A's, intact
    run_analyze(monkeypatch, glue_dir, other, out, "--overwrite")
    run_analyze(monkeypatch, glue_dir, other, tmp_path / "clean")
    np.testing.assert_array_equal(scores_of(out, "ekfac"), scores_of(tmp_path / "clean", "ekfac"))
    assert not np.array_equal(scores_of(out, "ekfac"), reference["ekfac"])


def test_two_processes_on_one_folder(glue_dir, checkpoints, reference, tmp_path):
    """The same command twice at once: one computes, the other waits and reuses; scores in dataset order exactly
    once (an unlocked in-place reorder applied the permutation twice). A race, so three rounds."""
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for round_ in range(3):
        argv = [sys.executable, str(ROOT / "analyze.py"),
                *analyze_argv(glue_dir, checkpoints, tmp_path / str(round_), "--factor_strategy", "identity")]
        processes = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
        logs = [p.communicate(timeout=600)[1] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], logs
        assert sum("Reusing scores" in log for log in logs) >= 1
        np.testing.assert_array_equal(scores_of(tmp_path / str(round_), "identity"), reference["identity"])


def test_damaged_scores_are_recomputed_by_analyze(monkeypatch, glue_dir, checkpoints, reference, tmp_path, capsys):
    """A scores file cut in half: `--inspect_query` (which reads through the rerun) recomputes, never a traceback."""
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity")
    path = tmp_path / "rte" / "scores_identity" / "pairwise_scores.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity", "--inspect_query", "0")
    np.testing.assert_array_equal(scores_of(tmp_path, "identity"), reference["identity"])
    assert f"[train {int(np.argmax(reference['identity'][0]))}]" in capsys.readouterr().out


def test_bad_output_and_sizes(glue_dir, checkpoints, tmp_path):
    common = ["--dataset_name", "rte", "--checkpoint_dir", str(checkpoints)]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(run_script("analyze.py", *analyze_argv(glue_dir, checkpoints, blocker)),
                      f"cannot write to {blocker}: {blocker} is not a directory")
    for flag in ("--train_batch_size", "--query_batch_size", "--top_k"):
        assert_user_error(run_script("analyze.py", *common, flag, "0"), f"{flag}: expected a positive integer")
    assert_user_error(run_script("analyze.py", *common, "--top_k", "-3"), "--top_k: expected a positive integer")


# ----------------------------------------------------------------------------------------------------------------------
# Token-level influence (--html)

def test_token_scores_sum_to_pairwise_and_ignore_padding(monkeypatch, glue_dir, checkpoints, tmp_path):
    """Per-token scores of each top example sum to its pairwise score (float64; ekfac and identity), and padding to
    max length gives the same per-token scores as dynamic padding."""
    exact = ["--float64", "--attn_implementation", "eager", "--use_empirical_fisher", "--inspect_query", "1",
             "--top_k", "2"]
    reports = {}
    for padding in ("dynamic", "padded"):
        extra = ["--pad_to_max_length"] if padding == "padded" else []
        run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / padding, *exact, *extra, "--html",
                    str(tmp_path / f"{padding}.html"))
        reports[padding] = json.loads((tmp_path / f"{padding}.json").read_text())
    pairwise = scores_of(tmp_path / "dynamic", "ekfac")
    examples = reports["dynamic"]["examples"]
    assert [e["index"] for e in examples] == influence.top_examples(pairwise[1], 2) and len(examples) == 4
    for example, padded in zip(examples, reports["padded"]["examples"]):
        assert len(example["token_scores"]) == len(example["tokens"]) > 3
        np.testing.assert_allclose(sum(example["token_scores"]), pairwise[1, example["index"]], rtol=1e-5)
        np.testing.assert_allclose(padded["token_scores"], example["token_scores"], rtol=1e-6,
                                   atol=1e-8 * np.abs(example["token_scores"]).max())
    # identity too (no factors: the raw gradients' dot products split over tokens)
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path / "identity", *exact, "--factor_strategy", "identity",
                "--html", str(tmp_path / "identity.html"))
    pairwise = scores_of(tmp_path / "identity", "identity")
    for example in json.loads((tmp_path / "identity.json").read_text())["examples"]:
        np.testing.assert_allclose(sum(example["token_scores"]), pairwise[1, example["index"]], rtol=1e-5)


def test_html_shows_every_word_in_order(monkeypatch, glue_dir, checkpoints, tmp_path):
    import html
    import re
    import subprocess

    page = tmp_path / "report.html"
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity", "--inspect_query", "2",
                "--top_k", "1", "--html", str(page))
    text, report = page.read_text(), json.loads((tmp_path / "report.json").read_text())
    train = pipeline.load_glue("rte", "train", str(glue_dir), N_TRAIN)
    blocks = text.split('<div class="ex">')[1:]
    assert len(blocks) == len(report["examples"]) == 2
    for block, example in zip(blocks, report["examples"]):
        chips = [html.unescape(chip) for chip in re.findall(r'<span class="w"[^>]*>(.*?)</span>', block)]
        assert chips == [word for _, word, _ in example["words"]]
        for segment, key in enumerate(("sentence1", "sentence2")):
            shown = "".join(word for part, word, _ in example["words"] if part == segment)
            assert train[example["index"]][key].replace(" ", "").startswith(shown) and shown  # in order, truncated
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: the page was not rendered")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=900,700", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_html_needs_a_query(checkpoints):
    result = run_script("analyze.py", "--dataset_name", "rte", "--checkpoint_dir", str(checkpoints), "--html", "x.html")
    assert_user_error(result, "--html draws the query of --inspect_query")


def test_self_influence_ranking_beside_the_scores(monkeypatch, glue_dir, checkpoints, tmp_path, capsys):
    import csv

    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity",
                "--compute_self_scores", "--inspect_self", "3")
    self_scores, meta = load_scores(str(tmp_path), "rte", "identity", kind="self")
    assert "self_influence_ranking.csv" in meta["files"]  # published with the scores, sha256 recorded
    with open(tmp_path / "rte" / "scores_identity" / "self_influence_ranking.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = pipeline.load_glue("rte", "train", str(glue_dir), N_TRAIN)
    assert [int(r["index"]) for r in rows] == np.argsort(-self_scores, kind="stable").tolist()
    assert all(r["sentence1"] == train[int(r["index"])]["sentence1"] for r in rows)
    np.testing.assert_allclose([float(r["self_influence"]) for r in rows], np.sort(self_scores)[::-1], rtol=1e-5)
    out = capsys.readouterr().out
    assert "Top 3 training examples by self-influence (identity)" in out and out.count("self-influence: ") == 3


def test_signatures_name_the_task_and_another_is_never_reused(monkeypatch, glue_dir, checkpoints, tmp_path):
    """Scores of a user's own Task (the loss instead of the margin) under the default name are not served to the
    default Task, nor the other way round; sets published before signatures named the Task count as GlueTask's."""

    class LossTask(GlueTask):
        measurement = "loss"

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    monkeypatch.setattr(influence, "ANALYSIS_TASK", LossTask)
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity")
    meta_path = tmp_path / "rte" / "scores_identity" / "glue_scores.json"
    meta = json.loads(meta_path.read_text())
    assert meta["signature"]["task"] == {"class": f"{__name__}.{LossTask.__qualname__}", "measurement": "loss"}
    monkeypatch.setattr(influence, "ANALYSIS_TASK", GlueTask)
    with pytest.raises(GlueError, match=r"computed with other arguments \(task differ\)"):
        run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity")
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity", "--overwrite")
    meta = json.loads(meta_path.read_text())
    assert meta["signature"]["task"] == {"class": "task.GlueTask", "measurement": "margin"}
    # A set published before signatures named the Task: GlueTask's, reused by it, refused to another Task.
    del meta["signature"]["task"]
    meta_path.write_text(json.dumps(meta))
    before = os.stat(tmp_path / "rte" / "scores_identity" / "pairwise_scores.safetensors").st_mtime_ns
    run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity")
    assert os.stat(tmp_path / "rte" / "scores_identity" / "pairwise_scores.safetensors").st_mtime_ns == before
    monkeypatch.setattr(influence, "ANALYSIS_TASK", LossTask)
    with pytest.raises(GlueError, match=r"task differ"):
        run_analyze(monkeypatch, glue_dir, checkpoints, tmp_path, "--factor_strategy", "identity")
