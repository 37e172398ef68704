"""results.py on plain files: publish and verified reads, refusal of other signatures and other data, stage
resumption, and a lock that a killed holder does not keep."""

import errno
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from glue_attribution import failpoints, results
from glue_attribution.errors import GlueError, ResultDamaged, ResultMissing


def make_result(folder, files: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def test_publish_then_verified_read(tmp_path):
    public = str(tmp_path / "scores_x")
    with pytest.raises(ResultMissing):
        results.read(public, "meta.json", "scores")
    staging = results.staging_dir(public, {"a": 1})
    make_result(staging, {"scores.bin": "0123456789"})
    assert not os.path.exists(public)
    results.publish(staging, public, "meta.json", {"signature": {"a": 1}, "provenance": {"num_train": 5}})
    assert not os.path.exists(staging)
    meta = results.read(public, "meta.json", "scores", expected={"num_train": 5})
    assert meta["files"]["scores.bin"]["size"] == 10
    with pytest.raises(GlueError, match=r"computed on other data than this run \(num_train 5 vs 6"):
        results.read(public, "meta.json", "scores", expected={"num_train": 6})
    assert results.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=False) is not None
    assert results.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=True) is None
    with pytest.raises(GlueError, match=r"other arguments \(a differ\); pass --overwrite"):
        results.reuse(public, "meta.json", "scores", {"a": 2}, overwrite=False)

    # Replacing a published result is one rename; a changed file is caught on read, and the owner recomputes.
    staging = results.staging_dir(public, {"a": 2})
    make_result(staging, {"scores.bin": "abc"})
    results.publish(staging, public, "meta.json", {"signature": {"a": 2}})
    with open(os.path.join(public, "scores.bin"), "w") as f:
        f.write("abd")
    with pytest.raises(ResultDamaged, match="scores.bin does not match its recorded sha256"):
        results.read(public, "meta.json", "scores")
    assert results.reuse(public, "meta.json", "scores", {"a": 1}, overwrite=False) is None
    with open(os.path.join(public, "meta.json"), "w") as f:
        f.write('{"signature": ')
    with pytest.raises(ResultDamaged, match="not valid JSON"):
        results.read(public, "meta.json", "scores")


def test_stages_resume_only_when_their_files_verify(tmp_path):
    root, work = str(tmp_path / "root"), str(tmp_path / "root" / "work")
    stages = ["first", "second", "third"]
    make_result(work, {"a.bin": "a"})
    results.record_stage(root, work, "first", set())
    before = results.files_in(work)
    make_result(work, {"b.bin": "b"})
    results.record_stage(root, work, "second", before)
    make_result(work, {"c.partial": "killed mid-write"})  # a third stage that never finished
    assert results.finished_stages(root, work, stages) == ["first", "second"]
    assert results.files_in(work) == {"a.bin", "b.bin"}
    make_result(work, {"b.bin": "changed"})  # the second stage no longer verifies: it and all after are redone
    assert results.finished_stages(root, work, stages) == ["first"]
    assert results.files_in(work) == {"a.bin"} and not os.path.exists(results.stage_record(root, "second"))


def test_lock_of_a_killed_process_blocks_no_one(tmp_path):
    public = str(tmp_path / "scores_x")
    holder = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from glue_attribution import results\n"
              "with results.lock(sys.argv[2]):\n"
              "    print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", holder, str(ROOT), public], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == -9 and "locked" in result.stdout
    waiter = ("import sys; sys.path.insert(0, sys.argv[1]); from glue_attribution import results\n"
              "with results.lock(sys.argv[2]):\n    print('acquired')")
    result = subprocess.run([sys.executable, "-c", waiter, str(ROOT), public], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "acquired"


def test_failpoint_counts_passes(monkeypatch):
    monkeypatch.setenv("GLUE_KILL_AT", "step:3")
    failpoints._passes.clear()
    failpoints.failpoint("step")
    failpoints.failpoint("other")
    failpoints.failpoint("step")  # the third pass would SIGKILL this process
    assert failpoints._passes == {("GLUE_KILL_AT", "step"): 2}
    monkeypatch.setenv("GLUE_FAIL_AT", "other:2")
    failpoints.failpoint("other")
    with pytest.raises(OSError) as raised:
        failpoints.failpoint("other")
    assert raised.value.errno == errno.ENOSPC
    assert results.digest({"b": 1, "a": [1, 2]}) == results.digest({"a": [1, 2], "b": 1})
