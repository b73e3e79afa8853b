"""The real `vicuna-sky` console script, as a user runs it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "serve", "eval", "delta", "plan", "check", "status", "logs", "down", "demo"]


def test_help_lists_every_command(cli):
    out = cli("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(cli, command):
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage: vicuna-sky " + command in out.stdout
    assert len(out.stdout.splitlines()) >= 4


def test_train_dryrun_prints_task_and_cost_table_offline(cli, clouds_enabled):
    out = cli("train", str(ROOT / "recipes" / "vicuna-7b.yaml"), "--dryrun", "--env", "LR=1e-05")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "EAGER_NEXT_REGION" in text and "A100" in text
    assert "LR: '1e-05'" in text or "LR: 1e-05" in text
    # The made-up session catalog: GCP only (the bucket's cloud), no H100 there.
    assert "offers, ranked" in text and "a2-highgpu-8g" in text and "a2-ultragpu-8g" in text
    assert "H100:8" in text and "no offer in the catalog" in text
    assert "transferred: MFU 35.2% measured on H200" in text
    assert "GPU types offered to SkyPilot: A100:8, A100-80GB:8 on gcp" in text  # best first


def test_plan_by_recipe_name(cli, clouds_enabled):
    out = cli("plan", "vicuna-13b")
    assert out.returncode == 0, out.stderr
    assert "a2-ultragpu-8g" in out.stdout and "budget $600" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "no-such-recipe"], "no recipe 'no-such-recipe'"),
        (["train", "vicuna-7b", "--env", "LRR=1", "--dryrun"], "did you mean 'LR'?"),
        (["train", "vicuna-7b", "--env", "oops", "--dryrun"], "--env expects KEY=VALUE"),
        (["plan", "tiny-cpu"], "the cost plan is for GPU recipes"),
        (["logs", "nothing", "--local"], "no local job named 'nothing'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(cli, args, message):
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_recipe_file_names_the_key(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes" / "vicuna-7b.yaml").read_text().replace("  lr:", "  lrate:"))
    out = cli("check", str(bad))
    assert out.returncode == 2
    assert "unknown key 'train.lrate' (did you mean 'train.lr'?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_validates_all_specs(cli):
    out = cli("check", "vicuna-13b")
    assert out.returncode == 0, out.stderr
    for spec in ("train.yaml", "serve-controller.yaml", "serve-worker.yaml", "service.yaml"):
        assert spec in out.stdout


def test_eval_launch_and_fleet_dryruns(cli):
    out = cli("eval", "launch", "vicuna-7b", "--dryrun", "--env", "JUDGE_MODEL=gpt-4o")
    assert out.returncode == 0, out.stderr
    assert "JUDGE_MODEL: gpt-4o" in out.stdout and "vicuna-sky eval judge" in out.stdout
    fleet = cli("serve", "tiny-cpu", "--fleet", "--dryrun")
    assert fleet.returncode == 0, fleet.stderr
    assert "vicuna_sky.serve.controller" in fleet.stdout


def test_missing_data_is_found_before_a_model_is_made(cli, tmp_path):
    """A recipe's own data missing from the bucket is refused before its built-in model is
    converted (a minute for SmolLM2), in one line."""
    raw = (ROOT / "recipes" / "smollm2-cpu.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(raw.replace("path: demo-sample", "path: data/mine.json"))
    out = cli("train", "mine.yaml", "--local", "--workdir", "w", timeout=60)
    assert out.returncode == 2, out.stdout
    assert "data.path 'data/mine.json' is neither a file here nor in the bucket" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w" / "runs" / "models").exists()


def test_tables_are_whole_when_not_on_a_terminal(tmp_path):
    """Piped (a log, a job's output), a table keeps its rows whole instead of folding them at
    80 columns."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    exe = Path(sys.executable).parent / "vicuna-sky"
    out = subprocess.run(
        [exe, "check", "smollm2-cpu"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "train.yaml" in line)
    assert "AWS([Spot], cpus=2+, disk_size=64), GCP([Spot], cpus=2+, disk_size=64)" in row
    # Serving stays on the bucket's cloud (s3://: AWS), and says so in the same table.
    row = next(line for line in out.stdout.splitlines() if "serve-worker.yaml" in line)
    assert "AWS([Spot], cpus=2+, ports=['8001'])" in row and "GCP" not in row
