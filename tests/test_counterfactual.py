"""run_counterfactual.py: rankings and the random baseline, removal, the flip rule and early stop, resume, shard
merge, results and figure, bad input -- on a stubbed retrain -- and one tiny end-to-end run with real retraining."""

import csv
import json
import sys

import numpy as np
import pytest

import run_counterfactual as rc
from conftest import assert_user_error, run_script, write_scores
from glue_attribution import counterfactual, pipeline, results, sweeps
from glue_attribution.config import CounterfactualConfig
from glue_attribution.errors import GlueError
from glue_attribution.scores import load_scores

N_TRAIN, N_DEV = 48, 16  # conftest's fixture sizes


@pytest.fixture
def scores_dir(tmp_path, glue_dir):
    rng = np.random.default_rng(0)
    for name in ("ekfac", "identity"):
        write_scores(tmp_path / "scores", name, rng.normal(size=(N_DEV, N_TRAIN)), glue_dir)
    return tmp_path / "scores"


class Stub:
    """A retrain whose query is correct unless k = n_train - len(keep) reaches `flip_at(query, seed)`; records calls
    and raises after `fail_after` of them (an interruption)."""

    def __init__(self, flip_at=lambda query, seed: 10 ** 9, fail_after=None):
        self.flip_at, self.fail_after, self.calls = flip_at, fail_after, []

    def __call__(self, keep, seed, queries):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((tuple(keep.tolist()), seed, tuple(queries)))
        k = N_TRAIN - len(keep)
        correct = np.array([k < self.flip_at(q, seed) for q in queries])
        return {"correct": correct, "margins": np.where(correct, 1.0, -1.0)}


def varied(query, seed):
    """Query 2 fails on base models with seed 1005; others flip at varying k, sometimes on only some seeds."""
    if query == 2 and seed == 1005:
        return 0
    return [3, 5, 100, 7, 100, 3][query % 6] + (seed - 1004) * (query % 2) * 3


def run_main(monkeypatch, retrain, glue_dir, scores_dir, output_dir, *extra):
    """run_counterfactual.main on the fixture RTE with `retrain` in place of real fine-tuning."""
    monkeypatch.setattr(sweeps, "retrainer", lambda args, train_text, query_text: retrain)
    argv = ["run_counterfactual.py", "--dataset_name", "rte", "--data_dir", str(glue_dir), "--output_dir",
            str(scores_dir), "--counterfactual_dir", str(output_dir), "--figure", str(output_dir / "fig.png"),
            "--train_batch_size", "8", "--max_query_examples", "6", "--remove_intervals", "2", "4", "6",
            "--num_base_repeat", "2", "--num_repeat", "2", "--max_seq_length", "32", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    rc.main()


def read_results(output_dir):
    return json.loads((output_dir / counterfactual.RESULTS_JSON).read_text())


def test_random_baseline_draws_training_examples_with_the_query_label(glue_dir, scores_dir):
    train_text = pipeline.load_glue("rte", "train", str(glue_dir))
    train_labels = np.array(train_text["label"])
    query_labels = pipeline.load_glue("rte", "validation", str(glue_dir), 6)["label"]
    config = CounterfactualConfig(strategies=["ekfac", "random"], output_dir=str(scores_dir), dataset_name="rte",
                                  seed=3, data_dir=str(glue_dir), max_seq_length=32,
                                  checkpoint_dir=str(scores_dir / "none"))
    rankings, _ = counterfactual.load_rankings(config, train_text, query_labels)
    assert list(rankings) == ["ekfac", "random"]
    for query, (ranking, label) in enumerate(zip(rankings["random"], query_labels)):
        assert sorted(ranking.tolist()) == np.flatnonzero(train_labels == label).tolist()  # training, same label
        assert ranking.tolist() == counterfactual.random_ranking(train_labels, label, 3, query).tolist()  # seeded
    assert rankings["random"][0].tolist() != counterfactual.random_ranking(train_labels, query_labels[0], 4, 0).tolist()
    scores = load_scores(str(scores_dir), "rte", "ekfac")[0]
    assert np.all(np.diff(scores[1, rankings["ekfac"][1]]) <= 0)  # most positive first


def test_removal_removes_exactly_the_top_k(tmp_path):
    ranking = np.random.default_rng(1).permutation(N_TRAIN)
    stub = Stub()
    rows = counterfactual.query_outcome(stub, str(tmp_path), ranking, 5, [2, 4, 6], [1004], N_TRAIN)
    assert [r["k"] for r in rows] == [2, 4, 6] and not any(r["flipped"] for r in rows)
    for (keep, _seed, queries), k in zip(stub.calls, [2, 4, 6]):
        assert len(keep) == N_TRAIN - k and not set(keep) & set(ranking[:k].tolist())
        assert set(keep) | set(ranking[:k].tolist()) == set(range(N_TRAIN)) and queries == (5,)


def test_flip_rule_and_early_stop(tmp_path):
    # Mean accuracy over seeds 0, 1, 2: k=2 -> 1, k=4 -> 2/3, k=6 -> 1/3 (flipped), k=8 -> not trained.
    stub = Stub(flip_at=lambda query, seed: [100, 6, 4][seed])
    rows = counterfactual.query_outcome(stub, str(tmp_path), np.arange(N_TRAIN), 0, [2, 4, 6, 8], [0, 1, 2], N_TRAIN)
    assert [r["accuracy"] for r in rows][:3] == pytest.approx([1, 2 / 3, 1 / 3]) and rows[3]["accuracy"] is None
    assert [r["flipped"] for r in rows] == [False, False, True, True]
    assert sorted(N_TRAIN - len(keep) for keep, _, _ in stub.calls) == [2] * 3 + [4] * 3 + [6] * 3
    # Exactly 0.5 is not below 0.5: not flipped.
    (tmp_path / "half").mkdir()
    half = counterfactual.query_outcome(Stub(flip_at=lambda query, seed: [100, 2][seed]), str(tmp_path / "half"),
                            np.arange(N_TRAIN), 0, [2], [0, 1], N_TRAIN)
    assert half == [{"query": 0, "k": 2, "accuracy": 0.5, "flipped": False}]


def test_bisect_finds_the_same_flips_with_fewer_retrains(tmp_path):
    """With a flip that persists for larger k, bisecting the k values gives the seed's outcome for every flip point,
    with ceil(log2(n + 1)) retrains per seed instead of up to n; k values it did not train have accuracy None."""
    intervals = [2, 4, 6, 8, 10, 12]
    for flip_at in [1, 2, 3, 5, 8, 11, 12, 13, 100]:
        outcomes = {}
        for search in ("ascending", "bisect"):
            stub = Stub(flip_at=lambda query, seed, k=flip_at: k)
            folder = tmp_path / f"{search}{flip_at}"
            folder.mkdir()
            outcomes[search] = counterfactual.query_outcome(stub, str(folder), np.arange(N_TRAIN), 0, intervals,
                                                            [0, 1], N_TRAIN, search)
            trained = sorted({N_TRAIN - len(keep) for keep, _, _ in stub.calls})
            assert len(stub.calls) == 2 * len(trained)  # each trained k: both seeds
            assert [r["k"] for r in outcomes[search] if r["accuracy"] is not None] == trained
        assert [r["flipped"] for r in outcomes["bisect"]] == [r["flipped"] for r in outcomes["ascending"]] \
            == [k >= flip_at for k in intervals]
        assert len([r for r in outcomes["bisect"] if r["accuracy"] is not None]) <= 3
    # Three k: always 2 retrains (the middle, then one side).
    for flip_at, trained in [(3, [2, 4]), (5, [4, 6]), (100, [4, 6])]:
        stub = Stub(flip_at=lambda query, seed, k=flip_at: k)
        (tmp_path / f"three{flip_at}").mkdir()
        counterfactual.query_outcome(stub, str(tmp_path / f"three{flip_at}"), np.arange(N_TRAIN), 0, [2, 4, 6], [0],
                                     N_TRAIN, "bisect")
        assert sorted(N_TRAIN - len(keep) for keep, _, _ in stub.calls) == trained


def test_search_names_the_results_folder_only_when_bisecting(glue_dir):
    args = rc.parse_args(["--dataset_name", "rte", "--data_dir", str(glue_dir)])
    assert "search" not in counterfactual.experiment_arguments(args)  # folders made before --search keep their name
    bisect = rc.parse_args(["--dataset_name", "rte", "--data_dir", str(glue_dir), "--search", "bisect"])
    assert counterfactual.experiment_arguments(bisect)["search"] == "bisect"
    assert counterfactual.results_dir(bisect) != counterfactual.results_dir(args)


def test_results_table_and_figure(monkeypatch, glue_dir, scores_dir, tmp_path):
    out = tmp_path / "out"
    stub = Stub(flip_at=varied)
    run_main(monkeypatch, stub, glue_dir, scores_dir, out)
    results = read_results(out)
    assert results["queries"] == [0, 1, 3, 4, 5]  # query 2 fails the base filter
    assert results["base_accuracy"][2] == 0.5 and len(results["base_accuracy"]) == 6
    assert list(results["flip_fraction"]) == ["ekfac", "identity", "random"]
    # The stub ignores which examples are removed, so every method sees the same outcome per query.
    expected = {0: [0, 1, 1], 1: [0, 0, 0], 3: [0, 0, 0], 4: [0, 0, 0], 5: [0, 0, 1]}  # q1, q5: 0.5 at k=4
    assert {q: [r["flipped"] for r in results["outcomes"] if r["method"] == "ekfac" and r["query"] == q]
            for q in results["queries"]} == {q: [bool(f) for f in v] for q, v in expected.items()}
    assert results["flip_fraction"]["random"] == pytest.approx([0, 0.2, 0.4])
    # Base: 2 seeds x all candidates in one retrain each; no retrain after a query flipped.
    assert sum(len(queries) == 6 for _, _, queries in stub.calls) == 2
    with open(out / "counterfactual_flip_fraction.csv") as f:
        assert list(csv.reader(f)) == [["k", "ekfac", "identity", "random"], ["2", *["0.0000"] * 3],
                                       ["4", *["0.2000"] * 3], ["6", *["0.4000"] * 3]]
    with open(out / "counterfactual_outcomes.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 5 * 3
    assert (out / "fig.png").read_bytes()[:4] == b"\x89PNG"
    # The figure is redrawn from the results file alone.
    (out / "fig.png").unlink()
    run_main(monkeypatch, None, tmp_path / "nothing", tmp_path / "nothing", out, "--plot_only")
    assert (out / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_is_recomputed_without_retraining(monkeypatch, glue_dir, scores_dir, tmp_path):
    out = tmp_path / "out"
    run_main(monkeypatch, Stub(flip_at=varied), glue_dir, scores_dir, out)
    first = read_results(out)
    assert {v["reference"] for v in first["versus"].values()} == {"ekfac"}  # the first of --strategies
    again = Stub(flip_at=varied)
    run_main(monkeypatch, again, glue_dir, scores_dir, out, "--reference", "random")
    versus = read_results(out)["versus"]
    assert again.calls == [] and set(versus) == {"ekfac", "identity"}  # same folder, nothing retrained
    assert versus["ekfac"]["mean"] == pytest.approx(-np.array(first["versus"]["random"]["mean"]))


def test_resume_redoes_nothing_finished(monkeypatch, glue_dir, scores_dir, tmp_path):
    interrupted = Stub(flip_at=varied, fail_after=9)
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, interrupted, glue_dir, scores_dir, tmp_path / "a")
    resumed = Stub(flip_at=varied)
    run_main(monkeypatch, resumed, glue_dir, scores_dir, tmp_path / "a")
    assert not set(interrupted.calls) & set(resumed.calls)
    once = Stub(flip_at=varied)
    run_main(monkeypatch, once, glue_dir, scores_dir, tmp_path / "b")
    assert sorted(interrupted.calls + resumed.calls) == sorted(once.calls)
    assert read_results(tmp_path / "a") == read_results(tmp_path / "b")
    again = Stub(flip_at=varied)
    run_main(monkeypatch, again, glue_dir, scores_dir, tmp_path / "a")
    assert again.calls == []

    # A corrupt run file: the rerun redoes that retrain alone (no numpy traceback) and gathers the same results.
    damaged = sorted((tmp_path / "a" / "runs" / "ekfac").glob("*.npz"))[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    repaired = Stub(flip_at=varied)
    run_main(monkeypatch, repaired, glue_dir, scores_dir, tmp_path / "a")
    assert len(repaired.calls) == 1 and read_results(tmp_path / "a") == read_results(tmp_path / "b")


def test_shards_merge_to_one_process(monkeypatch, glue_dir, scores_dir, tmp_path):
    shards = [Stub(flip_at=varied), Stub(flip_at=varied)]
    run_main(monkeypatch, shards[0], glue_dir, scores_dir, tmp_path / "a", "--shard_index", "0", "--num_shards", "2")
    assert not (tmp_path / "a" / counterfactual.RESULTS_JSON).exists()  # shard 1 has not run yet
    run_main(monkeypatch, shards[1], glue_dir, scores_dir, tmp_path / "a", "--shard_index", "1", "--num_shards", "2")
    run_main(monkeypatch, Stub(flip_at=varied), glue_dir, scores_dir, tmp_path / "b")
    assert read_results(tmp_path / "a") == read_results(tmp_path / "b")
    tested = [{queries for _, _, queries in stub.calls if len(queries) == 1} for stub in shards]
    assert tested == [{(0,), (4,)}, {(1,), (3,), (5,)}]  # queries split by shard; query 2 filtered out
    assert [sum(len(queries) == 6 for _, _, queries in stub.calls) for stub in shards] == [2, 0]  # base reused


def test_bad_input(monkeypatch, glue_dir, scores_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GlueError, match="leaves 7 of 48 training examples, less than one batch of 8"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--remove_intervals", "41")
    with pytest.raises(GlueError, match="training examples that 'random' can remove"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--remove_intervals", "30")
    with pytest.raises(GlueError, match="scores 'ekfac' .* computed on other data .*num_train 48 vs 40"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--max_train_samples", "40")
    with pytest.raises(GlueError, match="other data than this run .max_seq_length 32 vs 64"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--max_seq_length", "64")
    write_scores(scores_dir, "kfac", np.zeros((4, N_TRAIN)), glue_dir)
    with pytest.raises(GlueError, match="scores 'kfac' cover 4 queries, fewer than --max_query_examples 6"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--strategies", "kfac")
    with pytest.raises(GlueError, match="--reference kfac is not among the rankings .ekfac, identity, random."):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--reference", "kfac")
    with pytest.raises(GlueError, match="'stsb' is regression"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--dataset_name", "stsb")
    with pytest.raises(GlueError, match="no query passes the base filter"):
        run_main(monkeypatch, Stub(flip_at=lambda query, seed: 0), glue_dir, scores_dir, out)
    assert not (out / "fig.png").exists() and not (out / counterfactual.RESULTS_JSON).exists()
    with pytest.raises(GlueError, match="remove_intervals differ"):
        run_main(monkeypatch, Stub(), glue_dir, scores_dir, out, "--remove_intervals", "2", "4")
    with pytest.raises(GlueError, match="no results at"):
        run_main(monkeypatch, None, glue_dir, scores_dir, tmp_path / "empty", "--plot_only")


def test_script_end_to_end_and_missing_scores(tiny_model_dir, glue_dir, scores_dir, tmp_path):
    common = ["--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path", tiny_model_dir,
              "--output_dir", str(scores_dir), "--max_seq_length", "32", "--device", "cpu"]
    assert_user_error(run_script("run_counterfactual.py", *common, "--strategies", "ekfac", "kfac"),
                      "no finished scores 'kfac'", "python analyze.py", "--factor_strategy kfac")
    damaged = scores_dir / "rte" / "scores_identity" / "pairwise_scores.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert_user_error(run_script("run_counterfactual.py", *common, "--strategies", "identity"), "scores 'identity'",
                      "is damaged", "--factor_strategy identity")
    out = tmp_path / "out"
    result = run_script("run_counterfactual.py", *common, "--counterfactual_dir", str(out), "--figure",
                        str(tmp_path / "figure" / "counterfactual.png"), "--strategies", "ekfac",
                        "--max_query_examples", "4",
                        "--remove_intervals", "2", "4", "--num_base_repeat", "1", "--num_repeat", "1",
                        "--num_train_epochs", "1", "--train_batch_size", "8", "--learning_rate", "1e-3")
    assert result.returncode == 0, result.stderr
    outcomes = read_results(out)
    assert outcomes["queries"] and outcomes["num_train"] == N_TRAIN and len(outcomes["base_accuracy"]) == 4
    assert (tmp_path / "figure" / "counterfactual.png").is_file()
    base = results.load_run(str(out / "runs" / "base_s1004.npz"), {})
    assert base["correct"].shape == base["margins"].shape == (4,)
    query = outcomes["queries"][0]
    run = results.load_run(str(out / "runs" / "ekfac" / f"q{query}_k2_s1004.npz"), {})
    assert run["correct"].shape == (1,)


def test_flip_intervals_on_a_known_case():
    """40 queries: a method that flips all of them, one that flips half, one that flips none; the intervals cover
    the true fractions, a method that always flips has a zero-width interval, and the paired differences from the
    reference exclude 0 exactly where the methods differ."""
    always, half, never = np.ones((1, 40)), np.tile([[1.0, 0.0]], 20), np.zeros((1, 40))
    found = counterfactual.flip_intervals({"ekfac": always, "identity": half, "random": never}, "ekfac", 500, 0)
    assert found["flip_fraction_ci95"]["ekfac"] == [[1.0, 1.0]] and found["flip_fraction_ci95"]["random"] == [[0, 0]]
    low, high = found["flip_fraction_ci95"]["identity"][0]
    assert 0.3 < low < 0.5 < high < 0.7
    assert found["versus"]["identity"]["mean"] == [-0.5] and found["versus"]["identity"]["ci95"][0][1] < 0
    assert found["versus"]["random"]["ci95"] == [[-1.0, -1.0]] and "ekfac" not in found["versus"]


def test_a_full_disk_while_drawing_is_named_so(monkeypatch, glue_dir, scores_dir, tmp_path, capsys):
    from glue_attribution import cli

    monkeypatch.setenv("GLUE_FAIL_AT", "drawing")
    with pytest.raises(SystemExit) as stopped:
        cli.run(run_main, monkeypatch, Stub(), glue_dir, scores_dir, tmp_path / "out")
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on device in {tmp_path / 'out'}") and \
        "during drawing the counterfactual figure" in line
    assert read_results(tmp_path / "out")["queries"] and not (tmp_path / "out" / "fig.png").exists()
