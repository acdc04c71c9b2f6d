"""The error path of every script: a user error prints `error: ...` and exits with status 2,
before any work; a bug keeps its traceback."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def _script(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_line(text):
    return text.strip().splitlines()[-1]


# benchmark.py defines absl flags at import: it only runs in subprocesses here.
def test_benchmark_flag_errors_exit_2_before_anything_is_built(tmp_path):
    out = tmp_path / "bench.json"
    run = _script("benchmark.py", "--weighting=mgdaa", f"--out={out}")
    assert run.returncode == 2, run.stderr[-3000:]
    assert _last_line(run.stderr).startswith(
        "error: flag --weighting=['mgdaa']: unknown value 'mgdaa'; expected 'all' or some of "
        "['aligned_mtl', 'cagrad', ")
    assert "Traceback" not in run.stderr and "FATAL" not in run.stderr
    assert not out.exists()

    run = _script("benchmark.py", "--variants=mtl,weighting/mgda/exact/K=3", f"--out={out}")
    assert run.returncode == 2
    assert _last_line(run.stderr).startswith(
        "error: flag --variants=['mtl', 'weighting/mgda/exact/K=3']: unknown value "
        "'weighting/mgda/exact/K=3'; expected 'step_cost', 'architectures', or some of ['mtl', ")
    assert not out.exists()


def test_the_tasks_sweep_measures_each_variant_in_its_own_process_against_equal(tmp_path):
    out = tmp_path / "sweep.json"
    run = _script("benchmark_tasks.py", "--tasks_sweep=0", f"--out={out}")
    assert run.returncode == 2
    assert "unknown value '0'; expected task counts >= 1" in _last_line(run.stderr)
    run = _script("benchmark_tasks.py", "--tasks_sweep=3", "--sweep_variants=exact/chunked",
                  "--sweep_chunk_size=1", "--sweep_image_size=8", "--batch_size=4",
                  "--steps=1", "--repeats=1", f"--out={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["tasks"], r["variant"]) for r in rows] == [(3, "equal"), (3, "exact/chunked")]
    assert rows[0]["time_vs_equal"] == 1.0 and rows[0]["memory_vs_equal"] == 1.0
    assert rows[1]["jacobian_chunk_size"] == 1  # the loop over the tasks, one at a time
    assert all(r["peak_rss_mb"] >= r["training_peak_rss_mb"] * 0.99 > 100 for r in rows)
    assert "| 3 | exact/chunked |" in run.stdout


def test_launcher_refuses_a_command_that_cannot_run(tmp_path, capsys):
    launcher = _load("launch_local_workers")
    assert launcher.main(["--num_workers=2", "--", "no_such_program_for_mtl_tests", "-x"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: Cannot run the command 'no_such_program_for_mtl_tests': not found on PATH. ")
    missing = str(tmp_path / "missing.sh")
    assert launcher.main(["--", missing]) == 2
    assert f"error: Cannot run the command {missing!r}: no such file." in capsys.readouterr().err
    not_executable = tmp_path / "plain.sh"
    not_executable.write_text("echo hi\n")
    not_executable.chmod(not_executable.stat().st_mode & ~(stat.S_IXUSR | stat.S_IXGRP
                                                          | stat.S_IXOTH))
    assert launcher.main(["--", str(not_executable)]) == 2
    assert "not an executable file" in capsys.readouterr().err
    assert launcher.main(["--num_workers=0", "--", sys.executable, "-c", "pass"]) == 2
    assert "error: --num_workers must be an int >= 1; got 0." in capsys.readouterr().err
    assert launcher.main(["--num_workers=2"]) == 2
    assert "error: No command given; put it after `--`." in capsys.readouterr().err


def test_launcher_command_line_exits_2_with_the_message():
    run = _script("launch_local_workers.py", "--num_workers=2", "--",
                  "no_such_program_for_mtl_tests")
    assert run.returncode == 2
    assert _last_line(run.stderr).startswith("error: Cannot run the command "
                                             "'no_such_program_for_mtl_tests'")
    assert "Traceback" not in run.stderr and "[worker" not in run.stdout


def test_run_baselines_refuses_flags_it_sets_itself_before_training(tmp_path, capsys):
    script = _load("run_baselines")
    for extra, flag in ((["--tasks=right"], "--tasks=right"),
                        (["--train_steps=2", "-model_dir", "x"], "-model_dir")):
        assert script.main(["--experiment=multi_digits", f"--out={tmp_path / 'out'}", "--",
                            *extra]) == 2
        assert capsys.readouterr().err.startswith(
            f"error: {flag!r} after `--`: run_baselines sets --tasks, --model_dir, --architecture "
            "for each run itself")
    assert not (tmp_path / "out").exists()
    assert script.main(["--experiment=no_such_experiment", f"--out={tmp_path / 'out'}"]) == 2
    assert "error: --experiment='no_such_experiment': no experiment script " in \
        capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert script.main(["--experiment=multi_digits", f"--out={tmp_path / 'file'}"]) == 2
    assert "lies under the file" in capsys.readouterr().err
    assert script.main(["--experiment=multi_digits", f"--out={tmp_path / 'out'}",
                        "--parallel=0"]) == 2
    assert "error: --parallel=0: expected an int >= 1." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["export", "predict", "report", "run_baselines", "compare",
                                  "launch_local_workers"])
def test_argument_errors_are_reported_as_errors(name, capsys):
    script = _load(name)
    args = ["--num_workers=two"] if name == "launch_local_workers" else []
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("(--help lists the arguments)\n")
    assert err.count("\n") == 1
