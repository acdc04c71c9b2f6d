#!/usr/bin/env python
"""Starts N workers of a command on this machine with a correct TF_CONFIG each, for trying
multi-worker training (`--strategy=multi_worker`) without a cluster.

    python scripts/launch_local_workers.py --num_workers=2 -- \\
        python experiments/multi_digits.py --strategy=multi_worker --model_dir=runs/mw

Every worker gets the same command; ports are free ports on 127.0.0.1 picked by the OS; each
output line is prefixed with `[worker i]`. If a worker fails, the others are killed (a worker
whose peer is gone can hang in collective ops and ignore SIGTERM, so SIGKILL follows after a
grace period). The exit status is the first non-zero worker status, or 0; bad input (a command
that is not an executable, --num_workers < 1) prints `error: ...` and exits with status 2 before
any worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from mtl import cli
from mtl.errors import UsageError


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_configs(num_workers: int, ports: list[int]) -> list[str]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(num_workers)]


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[worker {index}] {line}")
        out.flush()


def launch(command: list[str], num_workers: int, timeout: float | None = None,
           grace: float = 10.0, env: dict | None = None) -> int:
    """Runs `command` as `num_workers` workers; returns the combined exit status."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise UsageError(f"--num_workers must be an int >= 1; got {num_workers!r}.")
    if not command:
        raise UsageError("No command given; put it after `--`.")
    check_executable(command[0], env)
    configs = tf_configs(num_workers, free_ports(num_workers))
    procs, pumps = [], []
    for i, config in enumerate(configs):
        worker_env = {**(env or os.environ), "TF_CONFIG": config}
        try:
            proc = subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except OSError as e:  # Found but not startable (e.g. a bad interpreter line).
            _stop(procs, grace)
            raise UsageError(f"Cannot start {command[0]!r} ({type(e).__name__}: "
                             f"{e.strerror or e}).") from None
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, sys.stdout), daemon=True)
        pump.start()
        pumps.append(pump)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch_local_workers: timed out after {timeout} s", file=sys.stderr)
                status = 124
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, grace)
        for pump in pumps:
            pump.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status


def check_executable(program: str, env: dict | None = None) -> str:
    """The path of `program` (a path, or a name looked up on PATH); `UsageError` when there is no
    such executable file, before any worker starts."""
    search = (env or os.environ).get("PATH")
    path = shutil.which(program, path=search)
    if path is None:
        where = ("no such file" if not os.path.exists(program) else "not an executable file") \
            if os.sep in program else "not found on PATH"
        raise UsageError(f"Cannot run the command {program!r}: {where}. Put the command each "
                         "worker runs after `--`, e.g. -- python experiments/multi_digits.py "
                         "--strategy=multi_worker.")
    return path


def _stop(procs, grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    while any(p.poll() is None for p in alive) and time.monotonic() < end:
        time.sleep(0.1)
    for p in alive:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(argv=None) -> int:
    """Launches the workers; returns their combined status. User errors raise
    `mtl.UsageError`."""
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds before all workers are killed (default: none).")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="The command each worker runs, after `--`.")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(command, args.num_workers, timeout=args.timeout)


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
