"""Runs the README's offline quick start on a fresh clone: no network, no `../shared` beside it, an empty HF cache.

    python tests/quickstart.py [--repo DIR] [--keep]

The committed HEAD of --repo (default: the repository this file is in) is cloned into a new temporary directory
that holds nothing else (so `../shared/glue_data` cannot be found), and the one ```bash block that follows the line
`<!-- quickstart -->` in the clone's README.md is run there with bash (`set -euo pipefail`), with
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 and HF_HOME an empty directory; where the kernel allows it
(`unshare -rn`), in a network namespace with no network at all. `python` is the interpreter running this script.
Each command is printed with its wall time. Exit status 0 and a one-line summary on success (the temporary
directory is removed); non-zero and one line saying why otherwise (the clone is kept for a failed command).

Stdlib only, so it runs before (and regardless of) the project's own imports.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "<!-- quickstart -->"
FENCE_OPEN = "```bash"
FENCE_CLOSE = "```"
# Caches that would bypass the empty HF_HOME.
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
                   "HF_ASSETS_CACHE")


class QuickstartError(Exception):
    """A reason to stop, worded as the one line the script prints."""


def extract_commands(readme: str) -> list[tuple[str, str]]:
    """The commands of the README's quick-start block, as (source, display): `source` is the command's lines verbatim
    (backslash continuations kept), `display` the same on one line. Blank lines and `# comment` lines are skipped.

    Raises QuickstartError unless there is exactly one MARKER line, immediately followed by a ```bash fence that is
    closed and holds at least one command.
    """
    lines = readme.splitlines()
    markers = [i for i, line in enumerate(lines) if line.strip() == MARKER]
    if not markers:
        raise QuickstartError(f"README.md has no quick-start block (a line {MARKER} followed by a {FENCE_OPEN} fence)")
    if len(markers) > 1:
        raise QuickstartError(f"README.md has {len(markers)} {MARKER} lines (lines "
                              f"{', '.join(str(i + 1) for i in markers)}); expected exactly one")
    start = markers[0] + 1
    if start >= len(lines) or lines[start].strip() != FENCE_OPEN:
        raise QuickstartError(f"README.md:{start}: {MARKER} is not immediately followed by a {FENCE_OPEN} line")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == FENCE_CLOSE), None)
    if end is None:
        raise QuickstartError(f"README.md:{start + 1}: the quick-start {FENCE_OPEN} block is never closed")

    commands, pending = [], []
    for line in lines[start + 1:end]:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if not line.endswith("\\"):
            commands.append(pending)
            pending = []
    if pending:
        raise QuickstartError(f"README.md:{end}: the quick-start block ends inside a `\\` continuation")
    if not commands:
        raise QuickstartError(f"README.md:{start + 1}: the quick-start block holds no command")
    return [("\n".join(c), " ".join(part.strip().removesuffix("\\").strip() for part in c)) for c in commands]


def build_script(commands: list[tuple[str, str]], times_file: str) -> str:
    """A bash script that prints and times each command, logging `start i µs` / `end i µs` to `times_file`."""
    out = ["set -euo pipefail",
           '__qs_now() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/[.,]/}"; '
           'else echo $(( $(date +%s%N) / 1000 )); fi; }',
           f"__qs_times={shlex.quote(times_file)}"]
    for i, (source, display) in enumerate(commands, start=1):
        header = f"[quickstart {i}/{len(commands)}] $ {display}"
        out += [f"printf '\\n%s\\n' {shlex.quote(header)}",
                "__qs_t0=$(__qs_now)",
                f'echo "start {i} $__qs_t0" >> "$__qs_times"',
                source,
                "__qs_t1=$(__qs_now)",
                f'echo "end {i} $__qs_t1" >> "$__qs_times"',
                f"printf '[quickstart {i}/{len(commands)}] done in %d.%d s\\n' "
                "$(( (__qs_t1 - __qs_t0) / 1000000 )) $(( (__qs_t1 - __qs_t0) / 100000 % 10 ))"]
    return "\n".join(out) + "\n"


def read_times(times_file: Path) -> tuple[dict, dict]:
    starts, ends = {}, {}
    if times_file.exists():
        for line in times_file.read_text().splitlines():
            kind, index, micros = line.split()
            (starts if kind == "start" else ends)[int(index)] = int(micros) / 1e6
    return starts, ends


def network_wrapper() -> list[str]:
    """`unshare` arguments that run a command with no network (a fresh network namespace), or [] where not allowed."""
    if shutil.which("unshare") is None:
        return []
    for wrapper in (["unshare", "--net", "--map-root-user"], ["unshare", "--net"]):
        try:
            probe = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return wrapper
    return []


def git(*args: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError as err:
        raise QuickstartError(f"cannot run git: {err}") from None
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise QuickstartError(f"git {' '.join(args)} failed: {message}")
    return result.stdout.strip()


def short_name(display: str) -> str:
    """`python train.py --flags` -> `train.py`, for the summary."""
    words = display.split()
    scripts = [w for w in words if w.endswith(".py")]
    return scripts[0] if scripts else (words[0] if words else "?")


def run(repo: Path, keep: bool) -> int:
    if not repo.is_dir():
        raise QuickstartError(f"--repo {repo} is not a directory")
    try:
        top = Path(git("rev-parse", "--show-toplevel", cwd=repo))
    except QuickstartError as err:
        raise QuickstartError(f"--repo {repo} is not a git repository ({err})") from None
    rev = git("rev-parse", "HEAD", cwd=top)
    if git("status", "--porcelain", "--untracked-files=no", cwd=top):
        print(f"quickstart: note: testing the committed HEAD {rev[:12]}; uncommitted changes in {top} are not included",
              flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="glue-quickstart-"))
    clone, hf_home, times_file = tmp / "repo", tmp / "hf_home", tmp / "times.txt"
    failed_command = False
    try:
        hf_home.mkdir()
        git("clone", "--quiet", "--no-checkout", str(top), str(clone))
        git("checkout", "--quiet", "--detach", rev, cwd=clone)
        if (clone.parent / "shared").exists():  # cannot happen (fresh directory), but it is what the run relies on
            raise QuickstartError(f"{clone.parent / 'shared'} exists; the clone must have no ../shared beside it")
        readme = clone / "README.md"
        if not readme.is_file():
            raise QuickstartError(f"the commit {rev[:12]} has no README.md")
        commands = extract_commands(readme.read_text(encoding="utf-8"))

        script = tmp / "quickstart.sh"
        script.write_text(build_script(commands, str(times_file)), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(hf_home))
        env.setdefault("MPLBACKEND", "Agg")
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        wrapper = network_wrapper()
        network = "no network (unshare --net)" if wrapper else "offline by environment only (unshare not permitted)"
        print(f"quickstart: {len(commands)} commands from README.md of {rev[:12]}, in {clone}; {network}; "
              f"python = {sys.executable}", flush=True)

        began = time.time()
        result = subprocess.run([*wrapper, "bash", str(script)], cwd=clone, env=env)
        finished = time.time()
        starts, ends = read_times(times_file)
        if result.returncode != 0:
            failing = max(starts, default=0)
            if failing and failing not in ends:
                failed_command = True
                raise QuickstartError(
                    f"command {failing}/{len(commands)} exited with status {result.returncode} after "
                    f"{finished - starts[failing]:.1f} s (clone kept in {tmp}): {commands[failing - 1][1]}")
            raise QuickstartError(f"bash exited with status {result.returncode} (before any command started)")
        timings = ", ".join(f"{short_name(commands[i - 1][1])} {ends[i] - starts[i]:.1f} s" for i in sorted(ends))
        kept = f"; kept {tmp}" if keep else ""
        print(f"\nquickstart: OK: {len(commands)} commands in {finished - began:.1f} s ({timings}) on a fresh clone "
              f"of {rev[:12]}; {network}{kept}", flush=True)
        return 0
    finally:
        if not (keep or failed_command):
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the git repository whose committed HEAD is cloned (default: the one holding this file)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone even on success")
    args = parser.parse_args(argv)
    try:
        return run(args.repo.resolve(), args.keep)
    except QuickstartError as err:
        print(f"quickstart: FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("quickstart: FAILED: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
