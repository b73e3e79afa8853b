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
    envs = {"NUM_EPOCHS": "16", "EVAL_PATH": "data/held.json", "EVAL_EVERY_STEPS": "4",
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
            if out.returncode == 0 and "(step 4)" in out.stdout and "RUNNING" in out.stdout:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no status of the run in progress: {seen}")
        live = out.stdout
        step, total = map(int, _field(live, "step").split("/"))
        assert 4 <= step < total == 32, live
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
    assert "vicuna-tiny-train: SUCCEEDED" in text and _field(text, "step") == "32/32"
    assert _field(text, "ETA") == "0.0 min"
    assert "(step 32)" in _field(text, "eval loss")
    spent = float(_field(text, "spent").split()[0].lstrip("$"))
    assert spent >= float(_field(live, "spent").split()[0].lstrip("$")) > 0
    # The same through `logs --metrics`; a name nobody ran is one line.
    logs = subprocess.run(
        [EXE, "logs", "vicuna-tiny-train", "--local", "--metrics", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert logs.returncode == 0 and _field(logs.stdout, "step") == "32/32", logs.stderr
    missing = _status(runs, "--local")
    assert missing.returncode == 0  # NAME with --local: still this run
    nobody = subprocess.run([EXE, "status", "nobody", "--runs-dir", str(runs)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert nobody.returncode != 0 and "no local job named 'nobody'" in nobody.stderr
    assert "Traceback" not in nobody.stderr and len(nobody.stderr.strip().splitlines()) == 1
