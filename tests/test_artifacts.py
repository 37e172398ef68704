"""artifacts.py on plain files: publish and verified reads, refusal of other signatures and other data, stage
resumption, and a lock that a killed holder does not keep."""

import os
import subprocess
import sys

import pytest

import artifacts
from conftest import ROOT


def make_result(folder, files: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def test_publish_then_verified_read(tmp_path):
    public = str(tmp_path / "scores_x")
    with pytest.raises(artifacts.Missing):
        artifacts.read(public, "meta.json", "scores")
    staging = artifacts.staging_dir(public, {"a": 1})
    make_result(staging, {"scores.bin": "0123456789"})
    assert not os.path.exists(public)
    artifacts.publish(staging, public, "meta.json", {"signature": {"a": 1}, "provenance": {"num_train": 5}})
    assert not os.path.exists(staging)
    meta = artifacts.read(public, "meta.json", "scores", expected={"num_train": 5})
    assert meta["files"]["scores.bin"]["size"] == 10
    with pytest.raises(artifacts.UserError, match=r"computed on other data than this run \(num_train 5 vs 6"):
        artifacts.read(public, "meta.json", "scores", expected={"num_train": 6})
    assert artifacts.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=False) is not None
    assert artifacts.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=True) is None
    with pytest.raises(artifacts.UserError, match=r"other arguments \(a differ\); pass --overwrite"):
        artifacts.reuse(public, "meta.json", "scores", {"a": 2}, overwrite=False)

    # Replacing a published result is one rename; a changed file is caught on read, and the owner recomputes.
    staging = artifacts.staging_dir(public, {"a": 2})
    make_result(staging, {"scores.bin": "abc"})
    artifacts.publish(staging, public, "meta.json", {"signature": {"a": 2}})
    with open(os.path.join(public, "scores.bin"), "w") as f:
        f.write("abd")
    with pytest.raises(artifacts.Damaged, match="scores.bin does not match its recorded sha256"):
        artifacts.read(public, "meta.json", "scores")
    assert artifacts.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=False) is None
    with open(os.path.join(public, "meta.json"), "w") as f:
        f.write('{"signature": ')
    with pytest.raises(artifacts.Damaged, match="not valid JSON"):
        artifacts.read(public, "meta.json", "scores")


def test_stages_resume_only_when_their_files_verify(tmp_path):
    root, work = str(tmp_path / "root"), str(tmp_path / "root" / "work")
    stages = ["first", "second", "third"]
    make_result(work, {"a.bin": "a"})
    artifacts.record_stage(root, work, "first", set())
    before = artifacts.files_in(work)
    make_result(work, {"b.bin": "b"})
    artifacts.record_stage(root, work, "second", before)
    make_result(work, {"c.partial": "killed mid-write"})  # a third stage that never finished
    assert artifacts.finished_stages(root, work, stages) == ["first", "second"]
    assert artifacts.files_in(work) == {"a.bin", "b.bin"}
    make_result(work, {"b.bin": "changed"})  # the second stage no longer verifies: it and all after are redone
    assert artifacts.finished_stages(root, work, stages) == ["first"]
    assert artifacts.files_in(work) == {"a.bin"} and not os.path.exists(artifacts.stage_record(root, "second"))


def test_lock_of_a_killed_process_blocks_no_one(tmp_path):
    public = str(tmp_path / "scores_x")
    holder = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import artifacts\n"
              "with artifacts.lock(sys.argv[2]):\n"
              "    print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", holder, str(ROOT), public], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == -9 and "locked" in result.stdout
    waiter = ("import sys; sys.path.insert(0, sys.argv[1]); import artifacts\n"
              "with artifacts.lock(sys.argv[2]):\n    print('acquired')")
    result = subprocess.run([sys.executable, "-c", waiter, str(ROOT), public], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "acquired"


def test_kill_point_counts_passes(monkeypatch):
    monkeypatch.setenv("GLUE_KILL_AT", "step:3")
    artifacts._passes.clear()
    artifacts.kill_point("step")
    artifacts.kill_point("other")
    artifacts.kill_point("step")  # the third pass would SIGKILL this process
    assert artifacts._passes == {"step": 2}
    assert artifacts.digest({"b": 1, "a": [1, 2]}) == artifacts.digest({"a": [1, 2], "b": 1})
