"""Runs a script of tests/workers/ in several processes at once (one per argument list, to use
every core) and gathers the JSON lines they print."""

import json
import os
import subprocess
import sys

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


def json_lines(script: str, argument_lists, *, timeout: float, log_level: str = "2") -> list:
    """Starts `workers/<script>` once per argument list, all at once; waits for each, asserting
    it succeeded (its stderr's tail otherwise); returns every line of their stdout that starts
    with "{", parsed, in the order of `argument_lists`."""
    procs = [subprocess.Popen([sys.executable, os.path.join(WORKERS, script), *arguments],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": log_level})
             for arguments in argument_lists]
    lines = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, stderr[-4000:]
        lines += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return lines
