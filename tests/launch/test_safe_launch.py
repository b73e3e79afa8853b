"""Bad input never loses data or escapes: `vicuna-sky train|check|status|logs` with names that
are paths, recipes with impossible numbers or a mistyped data path, budgets, broken job records
(issue #20)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert text in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def recipe(tmp_path: Path, base: str, old: str, new: str) -> Path:
    text = (ROOT / "recipes" / f"{base}.yaml").read_text()
    assert old in text
    path = tmp_path / f"{base}-changed.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "/tmp/x", ".hidden", ""])
def test_a_name_is_one_path_segment(cli, tmp_path, name):
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    result = cli("train", "tiny-cpu", "--local", "--name", name, "--runs-dir", "runs", cwd=work)
    one_line_error(result, "Invalid value for '--name'")
    assert [p.name for p in tmp_path.iterdir()] == ["deep"] and list(work.iterdir()) == []


@pytest.mark.parametrize("value", ["1e400", ".nan", ".inf"])
def test_recipe_numbers_must_be_finite(cli, tmp_path, value):
    path = recipe(tmp_path, "tiny-cpu", "epochs: 4", f"epochs: {value}")
    one_line_error(cli("check", str(path)), "'train.epochs' must be a finite number")


def test_a_mistyped_data_path_is_not_replaced_by_the_demo_sample(cli, tmp_path):
    path = recipe(tmp_path, "tiny-cpu", "path: demo-sample", "path: demo-sampel")
    result = cli("train", str(path), "--local", "--workdir", str(tmp_path / "w"), timeout=600)
    one_line_error(result, "data.path 'demo-sampel' is neither a file here nor in the")
    assert not list((tmp_path / "w").rglob("demo_sharegpt.js*"))
    assert not list((tmp_path / "w").rglob("job.json"))


def test_train_refuses_a_plan_over_budget(cli, tmp_path, clouds_enabled, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # Llama-2 is gated: that check passes
    path = recipe(tmp_path, "vicuna-7b", "budget_usd: 300", "budget_usd: 1")
    refused = cli("train", str(path))
    one_line_error(refused, "over the budget of $1")
    assert "pass --over-budget" in refused.stderr
    dry = cli("train", str(path), "--dryrun")
    assert dry.returncode == 0 and "OVER BUDGET" in dry.stdout


def test_a_job_record_that_is_a_directory(cli, tmp_path):
    runs = tmp_path / "runs"
    (runs / "odd-2026" / "job.json").mkdir(parents=True)
    (runs / "torn-2026").mkdir()
    (runs / "torn-2026" / "job.json").write_text('{"name": "torn", "ta')
    status = cli("status", "--local", "--runs-dir", str(runs))
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert "none" in status.stdout
    one_line_error(cli("logs", "odd", "--local", "--runs-dir", str(runs)), "no local job named")
    assert (runs / "torn-2026" / "job.json").read_text() == '{"name": "torn", "ta'


def test_demo_workdir_that_cannot_be_a_directory(cli, tmp_path):
    (tmp_path / "file").write_text("mine")
    one_line_error(cli("demo", "--workdir", str(tmp_path / "file")), "is a file, not a directory")
    result = cli("demo", "--workdir", str(tmp_path / "file" / "sub"))
    one_line_error(result, "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "mine"


def test_sigterm_of_a_local_train_leaves_no_process(tmp_path):
    import json
    import signal
    import sys
    import time

    import psutil

    exe = Path(sys.executable).parent / "vicuna-sky"
    proc = subprocess.Popen(
        [str(exe), "train", "tiny-cpu", "--local", "--name", "term-probe"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            jobs = list((tmp_path / "runs").glob("term-probe-*/job.json"))
            if jobs and json.loads(jobs[0].read_text())["status"] == "RUNNING":
                break
            time.sleep(0.2)
        time.sleep(1)
        job_processes = psutil.Process(proc.pid).children(recursive=True)
        assert job_processes
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err.decode()
    _, alive = psutil.wait_procs(job_processes, timeout=10)
    assert alive == []
    assert json.loads(jobs[0].read_text())["status"] == "CANCELLED"


def test_chaos_report_path_is_checked_before_the_run(cli, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text("keep")
    result = cli("chaos", "train", "tiny-cpu", "--workdir", "w", "--json", str(mine))
    one_line_error(result, "exists: pass --overwrite")
    path = recipe(tmp_path, "tiny-cpu", "epochs: 4", "epochs: 4")
    before = path.read_bytes()
    result = cli("chaos", "train", str(path), "--workdir", "w", "--json", str(path), "--overwrite")
    one_line_error(result, "is an input")
    assert mine.read_text() == "keep" and path.read_bytes() == before
    assert not (tmp_path / "w").exists()
