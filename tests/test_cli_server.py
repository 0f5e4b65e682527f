"""The suite's command runner behaves like a fresh ``python script``: exit status, output,
environment, working directory, uncaught exceptions, timeouts, and no state between runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli_server import run_fresh
from conftest import run_command

SCRIPT = """
import os, sys
import ocp_deq.cli as cli
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PROBE"))
print("seen before", getattr(cli, "_probe", None))
cli._probe = "set"
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "sleep":
    import time; time.sleep(30)
sys.exit(int(sys.argv[1]))
"""


def test_runs_like_a_fresh_interpreter(tmp_path, monkeypatch):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("PROBE", "x")
    first = run_command(script, 3, cwd=tmp_path)
    assert first.returncode == 3
    assert f"argv ['3'] cwd {tmp_path} env x" in first.stdout and first.stderr == "to stderr\n"
    again = run_command(script, 0, cwd=tmp_path, env={"PROBE": "y"})
    assert again.returncode == 0 and "env y" in again.stdout
    assert "seen before None" in again.stdout  # a module changed by the first run is pristine again
    failed = run_command(script, "raise", cwd=tmp_path)
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ValueError: boom")
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        run_command(script, "sleep", cwd=tmp_path, timeout=1)
    assert f'File "{script}", line 11 in <module>' in timeout.value.stderr  # a timed-out command shows where it hung
    assert run_command(script, 0, cwd=tmp_path).returncode == 0  # the server survives a killed command


def test_fresh_interpreter_shows_where_a_timed_out_command_hung(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(30)\n")
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        run_fresh([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), timeout=1)
    assert f'File "{script}", line 2 in <module>' in timeout.value.stderr
    done = run_fresh([sys.executable, "-c", "print('ok')"], cwd=tmp_path, env=dict(os.environ), timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n"
