"""`vicuna-sky status NAME`: a training run's live numbers, read from the metrics in its bucket
(the local backend's bucket is a folder), while the run is in progress and after it ends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXE = str(Path(sys.executable).parent / "vicuna-sky")


def _status(runs: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EXE, "status", "vicuna-tiny-train", "--runs-dir", str(runs), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def _field(text: str, label: str) -> str:
    match = re.search(rf"^  {label}\s+(.*)$", text, re.MULTILINE)
    assert match, (label, text)
    return match.group(1)


def test_status_of_a_local_run_in_progress_and_after_it_ends(tmp_path):
    work, runs = tmp_path / "w", tmp_path / "w" / "runs"
    held = work / "buckets" / "s3" / "vicuna-sky-tiny" / "data" / "held.json"
    held.parent.mkdir(parents=True)
    dummy = json.loads((FIXTURES / "fastchat" / "dummy_conversation.json").read_text())
    held.write_text(json.dumps(dummy[100:108]))
    envs = {"NUM_EPOCHS": "32", "EVAL_PATH": "data/held.json", "EVAL_EVERY_STEPS": "4",
            "METRICS_UPLOAD_SECONDS": "0"}  # fmt: skip
    args = ["train", "tiny-cpu", "--local", "--workdir", str(work)]
    args += [x for k, v in envs.items() for x in ("--env", f"{k}={v}")]
    train = subprocess.Popen([EXE, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, seen = time.monotonic() + 240, ""
        while time.monotonic() < deadline and train.poll() is None:
            out = _status(runs)
            seen = out.stdout + out.stderr
            # Any eval while it runs (a quiet machine trains between two polls past step 4).
            running = "RUNNING" in out.stdout and re.search(r"\(step [1-9]\d*\)", out.stdout)
            if out.returncode == 0 and running:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no status of the run in progress: {seen}")
        live = out.stdout
        step, total = map(int, _field(live, "step").split("/"))
        assert 4 <= step < total == 64, live
        assert float(_field(live, "train loss")) > 0
        eval_loss, base = re.fullmatch(
            r"([\d.]+) \(step \d+\), base model ([\d.]+)", _field(live, "eval loss")
        ).groups()
        assert float(eval_loss) < float(base)
        assert re.fullmatch(r"[\d,]+  \(tokens seen [\d,]+\)", _field(live, "tokens/s"))
        assert _field(live, "MFU") == "-"  # on CPU there is no peak to compare against
        assert re.fullmatch(r"[\d.]+ min", _field(live, "ETA"))
        assert _field(live, "preemptions") == "0"
        assert re.fullmatch(r"\$[\d.]+ at the spot price of .*catalog\)", _field(live, "spent")), (
            live
        )
        assert "runs/vicuna-tiny/main" in _field(live, "metrics")
    finally:
        out_text = train.communicate(timeout=600)[0]
    assert train.returncode == 0, out_text[-3000:]
    done = _status(runs)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "vicuna-tiny-train: SUCCEEDED" in text and _field(text, "step") == "64/64"
    assert _field(text, "ETA") == "0.0 min"
    assert "(step 64)" in _field(text, "eval loss")
    spent = float(_field(text, "spent").split()[0].lstrip("$"))
    assert spent >= float(_field(live, "spent").split()[0].lstrip("$")) > 0
    # The same through `logs --metrics`; a name nobody ran is one line.
    logs = subprocess.run(
        [EXE, "logs", "vicuna-tiny-train", "--local", "--metrics", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert logs.returncode == 0 and _field(logs.stdout, "step") == "64/64", logs.stderr
    missing = _status(runs, "--local")
    assert missing.returncode == 0  # NAME with --local: still this run
    nobody = subprocess.run([EXE, "status", "nobody", "--runs-dir", str(runs)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert nobody.returncode != 0 and "no local job named 'nobody'" in nobody.stderr
    assert "Traceback" not in nobody.stderr and len(nobody.stderr.strip().splitlines()) == 1


def test_status_of_a_cloud_run_reads_its_bucket(tmp_path):
    """A managed job's metrics as two attempts left them in the bucket (here a file:// one):
    the newest numbers, one preemption, and dollars for the time the attempts trained."""
    recipe = tmp_path / "r.yaml"
    text = (Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.yaml").read_text()
    recipe.write_text(text.replace("s3://vicuna-sky-tiny", f"file://{tmp_path / 'bucket'}"))
    metrics = tmp_path / "bucket" / "runs" / "vicuna-tiny" / "main" / "metrics"
    metrics.mkdir(parents=True)
    now = time.time()

    def record(step: int, at: float, **extra: float) -> str:
        fields = {"step": step, "time": now - at, "loss": 3.0 - step / 10, "seconds": 10.0}
        fields |= {"tokens": 100, "tokens_seen": 100 * step, "tokens_per_second": 10.0}
        return json.dumps(fields | {"mfu": 0.25, "total_steps": 10, **extra})

    first = [json.dumps({"step": 0, "time": now - 400, "eval_loss": 2.5, "total_steps": 10})]
    first += [record(s, 400 - 10 * s) for s in (1, 2, 3)]
    (metrics / "20261201T000000Z-aaaaaa.jsonl").write_text("\n".join(first) + "\n")
    second = [record(3, 200), record(4, 190, eval_loss=2.25), record(5, 180)]
    (metrics / "20261201T000500Z-bbbbbb.jsonl").write_text("\n".join(second) + "\n")
    out = subprocess.run(
        [EXE, "status", "vicuna-tiny-train", "--recipe", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    live = out.stdout
    assert _field(live, "step") == "5/10" and _field(live, "train loss") == "2.5000"
    assert _field(live, "eval loss") == "2.2500 (step 4), base model 2.5000"
    assert _field(live, "MFU") == "25.0%" and _field(live, "ETA") == "0.8 min"
    assert _field(live, "preemptions") == "1"
    # Billed: each attempt from its first step's start (its record's time less the step's own
    # 10 s) to its newest record: 400 - 370 = 30 s, then 210 - 180 = 30 s, at the catalog's
    # spot price (the test HOME's).
    from vicuna_sky.launch import cost
    from vicuna_sky.recipe import Recipe

    price = cost.prices_for(Recipe.from_yaml(recipe)).spot_hourly
    spent = _field(live, "spent")
    assert re.fullmatch(r"\$\d\.\d{4} at the spot price of .*", spent), live
    assert float(spent.split()[0][1:]) == pytest.approx(60 / 3600 * price, abs=5e-5)
    empty = subprocess.run(
        [EXE, "status", "other", "--recipe", str(recipe), "--tag", "nothing-here"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode != 0 and "no training metrics at" in empty.stderr
