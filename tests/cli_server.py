"""Run the repo's command lines (main.py, scripts/*.py) as forked children of one process that
has imported torch, fairchem and ocp_deq once.

A fresh ``python main.py`` spends ~10 s importing torch, torch_geometric and fairchem on
these 2-core machines, which was most of the suite's time. Each command still runs in its
own process (own modules' state, own exit status, own stdout/stderr, killed on timeout),
started by ``os.fork`` from a server that only imported modules (no torch thread pool
exists yet, so forking is safe). ``tests/test_radius_graph.py`` and ``test_compat.py``
keep checking a real fresh interpreter start-up; multi-process runs start in one too
(:func:`run_fresh`, used by ``cluster_helpers.run_main``).

Protocol: one JSON request per line on the server's stdin (script, argv, cwd, env, output
files, timeout), one JSON reply per line on its stdout ({"returncode": int, "timeout": bool}).

A command that times out is first sent SIGABRT, on which every Python process of its group
(the command and, through PYTHONFAULTHANDLER, the interpreters it spawned, e.g. the ranks of
a multi-process run) prints all its threads' stacks to the command's stderr: a hang shows
where it hangs. Then the group is killed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _Child(BaseException):
    """Raised in a forked child to leave the server loop before the command runs."""

    def __init__(self, request: dict):
        self.request = request


def _run_child(request: dict) -> int:
    """The command in this (forked) process, as ``python script argv...`` would run it."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.setpgid(0, 0)  # its own process group: a timeout kills it with anything it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["PYTHONFAULTHANDLER"] = "1"  # spawned interpreters dump their stacks on SIGABRT too
    faulthandler.enable()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # read by the OpenMP runtime at load time: the server loaded it with the default
        import torch

        torch.set_num_threads(int(threads))
    script = request["script"]
    sys.argv = [script, *request["argv"]]
    sys.path[0] = str(Path(script).parent)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        return 1
    return 0


def _abort_group(group: int) -> None:
    """A timed-out command's process group: SIGABRT (every Python process prints its stacks,
    see the module docstring), a moment to write them, then SIGKILL."""
    os.killpg(group, signal.SIGABRT)
    time.sleep(3)
    with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
        os.killpg(group, signal.SIGKILL)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timeout": False}
        if time.monotonic() > deadline:
            _abort_group(pid)
            os.waitpid(pid, 0)
            return {"returncode": -signal.SIGKILL, "timeout": True}
        time.sleep(0.05)


def serve() -> None:
    import ocp_deq.cli  # noqa: F401  (torch, torch_geometric, fairchem, ocp_deq)
    from fairchem.core.common.utils import setup_imports

    setup_imports()  # fairchem's model and trainer discovery, done by every command
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            raise _Child(request)
        print(json.dumps(_wait(pid, request["timeout"])), flush=True)


def run_fresh(command: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``command`` in a fresh interpreter (no fork server), in its own process group, with the
    same timeout handling as a served command: SIGABRT (stacks, PYTHONFAULTHANDLER), then kill."""
    with open(os.devnull) as stdin:
        proc = subprocess.Popen(command, cwd=cwd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _abort_group(proc.pid)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


class CommandServer:
    """The test side: start the server once, then ``run`` commands through it."""

    def __init__(self, folder: Path):
        self._folder = Path(folder)
        self._log = open(self._folder / "server.log", "w")
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, cwd=REPO)
        self._reply()

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the command server stopped; its log: {self._log.name}")
        return json.loads(line)

    def run(self, script: Path, args, cwd: Path, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
        """``python script args`` in ``cwd``: a CompletedProcess with text stdout and stderr.
        Raises subprocess.TimeoutExpired after ``timeout`` s (the command is killed)."""
        files = {name: self._folder / f"command.{name}" for name in ("stdout", "stderr")}
        args = [str(a) for a in args]
        request = {"script": str(script), "argv": args, "cwd": str(cwd), "env": dict(env or os.environ),
                   "timeout": timeout, **{k: str(v) for k, v in files.items()}}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._reply()
        stdout, stderr = (files[name].read_text(errors="replace") for name in ("stdout", "stderr"))
        for path in files.values():
            path.unlink()
        command = [sys.executable, str(script), *args]
        if reply["timeout"]:
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._log.close()
        shutil.rmtree(self._folder, ignore_errors=True)


if __name__ == "__main__":
    try:
        serve()
    except _Child as child:
        sys.stdout.flush()
        sys.exit(_run_child(child.request))
