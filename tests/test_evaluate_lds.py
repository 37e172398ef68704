"""evaluate_lds.py: masks, the LDS statistic on a known answer, a tiny resumable and shardable build, scoring, and
the bad inputs."""

import json
import os
import shutil

import numpy as np
import pytest
from scipy.stats import rankdata

import evaluate_lds
from conftest import assert_user_error, run_script, write_scores
from glue_attribution import lds, pipeline, results
from glue_attribution.config import LDSConfig
from glue_attribution.errors import GlueError


def lds_argv(command: str, glue_dir, model_dir: str, output_dir, *extra: str) -> list:
    """A tiny ground truth: 4 masks x 1 repeat of 16 of 32 RTE fixture examples, 8 queries, 1 epoch."""
    return [command, "--dataset_name", "rte", "--data_dir", str(glue_dir), "--model_name_or_path", model_dir,
            "--max_train_samples", "32", "--max_query_examples", "8", "--max_seq_length", "32", "--num_masks", "4",
            "--num_repeats", "1", "--num_train_epochs", "1", "--train_batch_size", "8", "--learning_rate", "1e-3",
            "--output_dir", str(output_dir), "--device", "cpu", *extra]


def run_mtimes(folder) -> dict:
    runs = os.path.join(folder, "runs")
    return {name: os.stat(os.path.join(runs, name)).st_mtime_ns for name in sorted(os.listdir(runs))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, glue_dir, tiny_model_dir):
    """A ground truth built as two shards: shard 0 alone (an interrupted build), then shard 1, which merges."""
    output_dir = tmp_path_factory.mktemp("lds")
    argv = lds_argv("build", glue_dir, tiny_model_dir, output_dir)
    evaluate_lds.build(evaluate_lds.parse_args(argv + ["--shard_index", "0", "--num_shards", "2"]))
    folder = lds.ground_truth_dir(evaluate_lds.parse_args(argv))
    after_shard0 = run_mtimes(folder)
    assert list(after_shard0) == ["mask0000_repeat000.npz", "mask0002_repeat000.npz"]
    assert not os.path.exists(os.path.join(folder, "margins.npy"))
    evaluate_lds.build(evaluate_lds.parse_args(argv + ["--shard_index", "1", "--num_shards", "2"]))
    return {"argv": argv, "folder": folder, "output_dir": output_dir, "after_shard0": after_shard0,
            "glue_dir": glue_dir}


def test_masks_keep_exact_fraction_and_are_reproducible():
    masks = lds.make_masks(50, 20, 0.3, seed=1)
    assert masks.shape == (20, 50) and masks.dtype == np.int8
    assert (masks.sum(axis=1) == 15).all()
    assert len({row.tobytes() for row in masks}) == 20
    np.testing.assert_array_equal(masks, lds.make_masks(50, 20, 0.3, seed=1))
    assert not np.array_equal(masks, lds.make_masks(50, 20, 0.3, seed=2))
    labels = np.array([0] * 36 + [1] * 14)
    stratified = lds.make_masks(50, 20, 0.5, seed=1, labels=labels)
    assert (stratified[:, labels == 0].sum(axis=1) == 18).all()
    assert (stratified[:, labels == 1].sum(axis=1) == 7).all()


def test_lds_known_answer():
    rng = np.random.default_rng(0)
    masks = lds.make_masks(200, 60, 0.5, seed=0)
    true_scores = rng.standard_normal((20, 200))
    margins = masks @ true_scores.T + 0.5 * rng.standard_normal((60, 20))  # (masks, queries)
    shuffled = np.stack([rng.permutation(row) for row in true_scores])
    table = lds.lds_table({"identity": shuffled, "true": true_scores}, masks, margins, 200, seed=0,
                                   reference="identity")
    assert table["true"]["mean"] > 0.95
    assert abs(table["identity"]["mean"]) < 0.1
    low, high = table["true"]["ci95_masks"]
    assert low <= table["true"]["mean"] <= high
    assert table["true"]["versus"]["ci95_masks"][0] > 0.7
    assert "versus" not in table["identity"]
    constant = lds.spearman_rows(np.ones((2, 5)), rng.standard_normal((2, 5)))
    np.testing.assert_array_equal(constant, [0.0, 0.0])


def test_build_resumes_missing_runs_and_shards_match_one_process(built, tmp_path):
    folder = built["folder"]
    masks = np.load(os.path.join(folder, "masks.npy"))
    assert masks.shape == (4, 32) and (masks.sum(axis=1) == 16).all()
    sharded = np.load(os.path.join(folder, "margins.npy"))
    assert sharded.shape == (4, 8)
    after = run_mtimes(folder)
    assert len(after) == 4
    assert all(after[name] == mtime for name, mtime in built["after_shard0"].items())  # shard 1 redid nothing of 0's
    with open(os.path.join(folder, "ground_truth.json")) as f:
        summary = json.load(f)
    assert summary["num_runs"] == 4 and summary["repeat_spearman"] is None

    single = str(tmp_path / "single")
    args = evaluate_lds.parse_args(built["argv"] + ["--lds_dir", single])
    evaluate_lds.build(args)
    np.testing.assert_allclose(np.load(os.path.join(single, "margins.npy")), sharded, atol=1e-5)

    # Killed after its second run (SIGKILL): the rerun redoes only the missing runs and merges the same margins.
    killed = str(tmp_path / "killed")
    result = run_script("evaluate_lds.py", *built["argv"], "--lds_dir", killed, GLUE_KILL_AT="lds_run_saved:2")
    assert result.returncode == -9 and len(os.listdir(os.path.join(killed, "runs"))) == 2
    assert not os.path.exists(os.path.join(killed, "ground_truth.json"))
    before = run_mtimes(killed)
    args = evaluate_lds.parse_args(built["argv"] + ["--lds_dir", killed])
    evaluate_lds.build(args)
    assert all(run_mtimes(killed)[name] == mtime for name, mtime in before.items())
    np.testing.assert_allclose(np.load(os.path.join(killed, "margins.npy")), sharded, atol=1e-5)

    # A corrupt run file is redone by the build, never a numpy traceback.
    path = os.path.join(killed, "runs", "mask0001_repeat000.npz")
    with open(path, "r+b") as f:
        f.truncate(100)
    before = run_mtimes(killed)
    evaluate_lds.build(args)
    assert {name for name, mtime in run_mtimes(killed).items() if mtime != before[name]} == {"mask0001_repeat000.npz"}
    np.testing.assert_allclose(np.load(os.path.join(killed, "margins.npy")), sharded, atol=1e-5)


def test_damaged_ground_truth_and_scores_are_one_line(built, tmp_path):
    """`score` is a consumer: a damaged input is one line naming the command that repairs it."""
    folder = str(tmp_path / "gt")
    shutil.copytree(built["folder"], folder)
    argv = ["score", *built["argv"][1:], "--lds_dir", folder, "--strategies", "identity"]
    write_scores(built["output_dir"], "identity", np.ones((8, 32)), built["glue_dir"])
    margins = os.path.join(folder, "margins.npy")
    with open(margins, "r+b") as f:
        f.truncate(64)
    assert_user_error(run_script("evaluate_lds.py", *argv), "margins.npy does not match its recorded sha256",
                      f"repair it with: python evaluate_lds.py build --lds_dir {folder}")
    evaluate_lds.build(evaluate_lds.parse_args(["build", *argv[1:-2]]))  # repairs from the kept runs
    np.testing.assert_array_equal(np.load(margins), np.load(os.path.join(built["folder"], "margins.npy")))
    scores = os.path.join(built["output_dir"], "rte", "scores_identity", "pairwise_scores.safetensors")
    with open(scores, "r+b") as f:
        f.truncate(os.path.getsize(scores) // 2)
    assert_user_error(run_script("evaluate_lds.py", *argv), "scores 'identity'", "is damaged",
                      "python analyze.py --dataset_name rte")


def test_score_table_json_plot_and_query(built, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("identity", "ekfac"):
        write_scores(built["output_dir"], name, rng.standard_normal((8, 32)), built["glue_dir"])
    figure = tmp_path / "lds.png"
    argv = [*built["argv"], "--strategies", "ekfac", "identity", "--num_bootstrap", "50", "--figure", str(figure),
            "--inspect_query", "3", "--top_k", "2"]
    evaluate_lds.score(evaluate_lds.parse_args(["score", *argv[1:]]))
    out = capsys.readouterr().out
    for fragment in ("ekfac", "identity", "same-label", "random", "vs ekfac", "Query 3:", "sentence1:",
                     "Top 2 most positively influential training examples (ekfac)"):
        assert fragment in out
    with open(os.path.join(built["folder"], "lds_results.json")) as f:
        results = json.load(f)
    assert list(results["results"]) == ["ekfac", "identity", "same-label", "random"]
    assert set(results["results"]["ekfac"]) == {"mean", "se_queries", "ci95_masks", "per_query"}  # the reference
    assert len(results["results"]["ekfac"]["per_query"]) == 8
    assert results["results"]["identity"]["versus"]["reference"] == "ekfac"
    assert results["num_masks"] == 4 and results["num_queries"] == 8 and figure.stat().st_size > 0


def test_bad_inputs(built, tmp_path):
    def score(*extra):
        evaluate_lds.score(evaluate_lds.parse_args(["score", *built["argv"][1:], *extra]))

    # Missing scores: the real command line, one line naming the analyze.py command.
    result = run_script("evaluate_lds.py", "score", *built["argv"][1:], "--strategies", "kfac")
    assert_user_error(result, "no finished scores 'kfac'", "python analyze.py --dataset_name rte --output_dir",
                      "--factor_strategy kfac")
    write_scores(built["output_dir"], "short_train", np.zeros((8, 31)), built["glue_dir"])
    with pytest.raises(GlueError, match="computed on other data .*num_train 31 vs 32; train_data differs"):
        score("--strategies", "short_train")
    write_scores(built["output_dir"], "short_query", np.zeros((7, 32)), built["glue_dir"])
    with pytest.raises(GlueError, match="num_query 7 vs 8; query_data differs"):
        score("--strategies", "short_query")
    write_scores(built["output_dir"], "long", np.zeros((8, 32)), built["glue_dir"], max_seq_length=64)
    result = run_script("evaluate_lds.py", "score", *built["argv"][1:], "--strategies", "long")
    assert_user_error(result, "scores 'long'", "computed on other data than this run (max_seq_length 64 vs 32")
    with pytest.raises(GlueError, match="out of range: there are 8 queries"):
        score("--inspect_query", "8")
    with pytest.raises(GlueError, match="--strategies random: that name is one of the table's reference rows"):
        score("--strategies", "ekfac", "random")
    with pytest.raises(GlueError, match="no finished LDS ground truth"):
        score("--learning_rate", "5e-4")
    with pytest.raises(GlueError, match=r"other arguments \(recipe differ\)"):
        score("--learning_rate", "5e-4", "--lds_dir", built["folder"])
    with pytest.raises(GlueError, match=r"other arguments \(num_masks differ\)"):
        evaluate_lds.build(evaluate_lds.parse_args([*built["argv"], "--num_masks", "5", "--lds_dir",
                                                    built["folder"]]))
    for fraction in ("0", "1.5"):
        with pytest.raises(GlueError, match=r"--subset_fraction must be in \(0, 1\)"):
            evaluate_lds.parse_args(["build", "--subset_fraction", fraction])


def test_subcommand_is_required_and_score_defaults_to_the_seed_settings():
    result = run_script("evaluate_lds.py")
    assert result.returncode == 2 and "required: {build,score,ensembles}" in result.stderr
    assert run_script("evaluate_lds.py", "--strategies", "kfac").returncode == 2
    args = evaluate_lds.parse_args(["score"])
    assert (args.command, args.dataset_name, args.strategies) == ("score", "rte", ["ekfac"])
    assert (args.num_masks, args.num_repeats, args.subset_fraction, args.stratify_masks) == (100, 5, 0.5, False)


def test_lds_dir_configures_its_own_flags(built, tmp_path):
    """`score --lds_dir D` reads the ground truth's flags from D/experiment_args.json: none needs repeating."""
    args = evaluate_lds.parse_args(["score", "--lds_dir", built["folder"], "--output_dir", str(built["output_dir"])])
    assert (args.dataset_name, args.num_masks, args.num_repeats, args.max_query_examples) == ("rte", 4, 1, 8)
    assert (args.learning_rate, args.max_train_samples, args.data_dir) == (1e-3, 32, str(built["glue_dir"]))
    assert lds.ground_truth_dir(args) == built["folder"]
    assert_user_error(run_script("evaluate_lds.py", "score", "--lds_dir", str(tmp_path / "typo")),
                      f"no LDS ground truth at --lds_dir {tmp_path / 'typo'}; build it with")
    write_scores(built["output_dir"], "identity", np.ones((8, 32)), built["glue_dir"])
    evaluate_lds.score(evaluate_lds.parse_args(["score", "--lds_dir", built["folder"], "--output_dir",
                                                str(built["output_dir"]), "--strategies", "identity",
                                                "--num_bootstrap", "10", "--figure", str(tmp_path / "lds.png")]))
    assert (tmp_path / "lds.png").is_file()


def test_folders_of_the_earlier_naming_are_found(tmp_path):
    """LDS folders used to be named by the first 10 hex digits of the same digest: such a folder is used."""
    arguments = {"num_masks": 4, "seed": 0}
    new = results.experiment_dir(str(tmp_path), "lds", arguments)
    assert os.path.basename(new) == f"lds_{results.digest(arguments)}" and len(results.digest(arguments)) == 16
    legacy = tmp_path / f"lds_{results.digest(arguments)[:10]}"
    legacy.mkdir()
    assert results.experiment_dir(str(tmp_path), "lds", arguments) == str(legacy)


def test_noise_ceiling_on_a_synthetic_ground_truth_with_known_noise():
    """Margins = signal + noise of the signal's variance, 2 repeats: one retrain's reliability is 1/2, the average's
    2/3, so the ceiling is sqrt(2/3) = 0.816 in Pearson terms (0.80 in Spearman's); the oracle (the scores that make
    the signal) reaches it, a half-informative set about half of it, each with an interval around the truth."""
    rng = np.random.default_rng(0)
    masks = lds.make_masks(100, 600, 0.5, seed=0)
    oracle = rng.standard_normal((5, 100))
    signal = masks @ oracle.T
    signal = (signal - signal.mean(0)) / signal.std(0)  # unit variance per query
    repeats = signal[:, None, :] + rng.standard_normal((600, 2, 5))
    half = oracle + 1.7 * rng.standard_normal(oracle.shape)
    ceiling = lds.noise_ceiling(repeats, 200, seed=0)
    assert ceiling["mean"] == pytest.approx(0.80, abs=0.03) and ceiling["num_repeats"] == 2
    assert ceiling["ci95_masks"][0] < ceiling["mean"] < ceiling["ci95_masks"][1]
    table = lds.lds_table({"oracle": oracle, "half": half}, masks, repeats.mean(axis=1), 200, 0,
                          repeat_margins=repeats)
    assert table["oracle"]["mean"] == pytest.approx(ceiling["mean"], abs=0.03)
    low, high = table["oracle"]["fraction_of_ceiling"]["ci95_masks"]
    assert low < 1 < high and table["oracle"]["fraction_of_ceiling"]["mean"] == pytest.approx(1, abs=0.04)
    assert 0.2 < table["half"]["fraction_of_ceiling"]["mean"] < 0.8
    single = lds.lds_table({"oracle": oracle}, masks, repeats.mean(axis=1), 10, 0)
    assert "fraction_of_ceiling" not in single["oracle"]  # one repeat: no ceiling


def test_score_reports_the_noise_ceiling_with_two_repeats(glue_dir, tiny_model_dir, tmp_path, capsys):
    argv = lds_argv("build", glue_dir, tiny_model_dir, tmp_path)
    argv[argv.index("--num_repeats") + 1] = "2"
    evaluate_lds.build(evaluate_lds.parse_args(argv))
    write_scores(tmp_path, "identity", np.random.default_rng(0).standard_normal((8, 32)), glue_dir)
    evaluate_lds.score(evaluate_lds.parse_args(["score", *argv[1:], "--strategies", "identity",
                                                "--num_bootstrap", "20"]))
    assert "noise ceiling" in capsys.readouterr().out
    folder = lds.ground_truth_dir(evaluate_lds.parse_args(argv))
    with open(os.path.join(folder, "lds_results.json")) as f:
        saved = json.load(f)
    assert saved["noise_ceiling"]["num_repeats"] == 2 and 0 <= saved["noise_ceiling"]["mean"] <= 1
    assert set(saved["results"]["identity"]["fraction_of_ceiling"]) == {"mean", "ci95_masks"}


def test_label_baseline_scores_a_ground_truth_that_follows_the_mean_target():
    """Regression: margins that move with the kept examples' mean target give the `label` row an LDS of 1 (on
    unstratified masks this shortcut needs no example-level attribution); classification has no such row."""
    rng = np.random.default_rng(0)
    targets = rng.uniform(0, 5, 40)
    masks = lds.make_masks(40, 30, 0.5, 0)
    margins = (masks @ targets)[:, None] * np.array([1.0, 2.0, 0.5])  # 3 queries, each following the mean target
    baselines = lds.baseline_scores(LDSConfig(dataset_name="stsb", seed=0), targets, [1.0, 2.0, 3.0])
    assert list(baselines) == ["label", "random"]
    ranks = rankdata(margins.T, axis=1)
    np.testing.assert_allclose(lds.lds_per_query(baselines["label"], masks, ranks), 1.0)
    assert abs(lds.lds_per_query(baselines["random"], masks, ranks).mean()) < 0.5
    classes = lds.baseline_scores(LDSConfig(dataset_name="rte", seed=0), [0, 1, 1], [1, 0])
    assert list(classes) == ["same-label", "random"]


def test_stratified_masks_for_regression_hold_the_mean_target():
    """Regression strata are runs of 10 training examples in target order: each mask keeps 5 of each, so the kept
    examples' mean target barely moves between masks. At any fraction and size the total stays exact and each
    stratum keeps within one of its share."""
    rng = np.random.default_rng(0)
    targets = rng.uniform(0, 5, 200)
    strata = lds.mask_strata(targets, is_regression=True)
    assert np.bincount(strata).tolist() == [10] * 20
    assert (np.diff(strata[np.argsort(targets)]) >= 0).all()  # strata follow the target order
    np.testing.assert_array_equal(lds.mask_strata([0, 2, 1], is_regression=False), [0, 2, 1])  # classes unchanged
    stratified, plain = lds.make_masks(200, 40, 0.5, 0, strata, ordered=True), lds.make_masks(200, 40, 0.5, 0)
    assert all((stratified[:, strata == s].sum(axis=1) == 5).all() for s in range(20))
    assert (stratified @ targets).std() < 0.2 * (plain @ targets).std()
    for n, fraction in [(201, 0.05), (201, 0.25), (57, 0.75), (200, 0.45)]:
        strata = lds.mask_strata(rng.uniform(0, 5, n), is_regression=True)
        masks = lds.make_masks(n, 5, fraction, 1, strata, ordered=True)
        assert (masks.sum(axis=1) == round(fraction * n)).all()
        shares = np.stack([masks[:, strata == s].sum(axis=1) for s in range(strata.max() + 1)], axis=1)
        assert (np.abs(shares - fraction * np.bincount(strata)) < 1).all()


def test_build_stratifies_regression_masks_by_target(glue_dir, tiny_model_dir, tmp_path):
    argv = [a if a != "rte" else "stsb" for a in lds_argv("build", glue_dir, tiny_model_dir, tmp_path)]
    args = evaluate_lds.parse_args(argv + ["--stratify_masks", "--num_masks", "3"])
    evaluate_lds.build(args)
    masks = np.load(os.path.join(lds.ground_truth_dir(args), "masks.npy"))
    targets = np.array(pipeline.load_glue("stsb", "train", str(glue_dir), 32)["label"])
    np.testing.assert_array_equal(masks, lds.make_masks(32, 3, 0.5, 0, lds.mask_strata(targets, True), ordered=True))
    assert not np.array_equal(masks, lds.make_masks(32, 3, 0.5, 0))
