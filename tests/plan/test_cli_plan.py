"""`vicuna-sky plan` as a user runs it: JSON with the same keys for every plan, tables, and every
bad input one line with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REAL_CATALOG, ROOT

SEVEN_B = (ROOT / "recipes" / "vicuna-7b.yaml").read_text()
LIST = "[A100-80GB:8, H100:8, A100:8]"


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def keys(value):
    """The key structure of a JSON value: dicts by their keys, lists by their items'."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list):
        shapes = [keys(v) for v in value if isinstance(v, (dict, list))]
        assert all(s == shapes[0] for s in shapes), "list items differ in their keys"
        return [shapes[0]] if shapes else []
    return None


def test_json_has_the_same_keys_for_every_plan(cli, tmp_path, clouds_enabled):
    recipes = {
        "7b": str(ROOT / "recipes" / "vicuna-7b.yaml"),
        "13b": str(ROOT / "recipes" / "vicuna-13b.yaml"),
        # Preempted 5 times an hour: no spot figure, on demand recommended.
        "flaky": write(
            tmp_path,
            "flaky",
            SEVEN_B.replace("  mfu: 0.4\n", "  mfu: 0.4\n  preemptions_per_hour: 5\n"),
        ),
        # Nothing fits: 13B parameters on 8 x L4.
        "none": write(
            tmp_path,
            "none",
            SEVEN_B.replace(LIST, "[L4:8]").replace("params_b: 6.74", "params_b: 13"),
        ),
    }
    plans = {}
    for name, path in recipes.items():
        out = cli("plan", path, "--json", "--catalog", str(REAL_CATALOG), "--any-cloud")
        assert out.returncode == 0, out.stderr
        plans[name] = json.loads(out.stdout)  # only JSON on stdout
    assert (
        plans["flaky"]["expected_spot_usd"] is None and plans["flaky"]["recommended"] == "on-demand"
    )
    assert plans["flaky"]["expected_usd"] > 0
    assert plans["none"]["offers"] == [] and plans["none"]["best"]["gpu"] is None
    assert plans["none"]["gpus"][0]["status"] == "does not fit"
    assert plans["13b"]["best"]["gpu"] == "H100"
    top = {name: set(p) for name, p in plans.items()}
    assert all(t == top["7b"] for t in top.values())
    # Every dict at every depth has the same keys; offers (where there are some) too.
    shapes = {
        name: keys({k: v for k, v in p.items() if k != "offers"}) for name, p in plans.items()
    }
    assert all(s == shapes["7b"] for s in shapes.values())
    offer_shapes = {
        json.dumps(keys(p["offers"]), sort_keys=True) for p in plans.values() if p["offers"]
    }
    assert len(offer_shapes) == 1


def test_tables_name_the_best_offer_and_what_was_left_out(cli, clouds_enabled):
    out = cli("plan", "vicuna-7b", "--catalog", str(REAL_CATALOG), "--any-cloud", "--top", "30")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "offers, ranked (enabled clouds first)" in text
    assert "use1-az1 2.47 outlier" in text  # flagged, not taken
    assert "SkyPilot's own choice differs: aws us-east-1 p4d.24xlarge (A100)" in text
    assert "seed figure: ~$140" in text and "at the seed's settings (A100-80GB, unpacked" in text
    assert "best: " in text and "budget $300" in text
    restricted = cli("plan", "vicuna-7b", "--catalog", str(REAL_CATALOG))
    assert "offers restricted to gcp, the bucket's cloud" in restricted.stdout


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("params_b: 6.74", "params_b: 0"), "'model.params_b' must be positive, got 0"),
        (("params_b: 6.74", "params_b: -7"), "'model.params_b' must be positive, got -7"),
        ((LIST, "[X100:8]"), "unknown GPU 'X100': no gcp catalog offers it"),
        (("regions: []", "regions: [gcp/us-nowhere1]"), "'gcp/us-nowhere1' has no 8-GPU offer"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(cli, tmp_path, edit, message):
    old, new = edit
    assert old in SEVEN_B
    path = write(tmp_path, "bad", SEVEN_B.replace(old, new))
    out = cli("plan", path, "--json", "--catalog", str(REAL_CATALOG))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""
    assert "Traceback" not in out.stderr


def test_lower_case_gpu_names_plan(cli, tmp_path, clouds_enabled):
    path = write(tmp_path, "lower", SEVEN_B.replace(LIST, "[h100:8, a100-80gb:8]"))
    out = cli("plan", path, "--json", "--catalog", str(REAL_CATALOG))
    assert out.returncode == 0, out.stderr
    assert [g["gpu"] for g in json.loads(out.stdout)["gpus"]] == ["H100", "A100-80GB"]


def test_a_malformed_catalog_is_named(cli, tmp_path):
    (tmp_path / "cat" / "gcp").mkdir(parents=True)
    bad = tmp_path / "cat" / "gcp" / "vms.csv"
    bad.write_text("not,a\ncatalog,at all\n")
    out = cli("plan", "vicuna-7b", "--catalog", str(tmp_path / "cat"))
    assert out.returncode == 2
    assert f"{bad}: not a SkyPilot v8 catalog" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_skypilots_fetch_messages_stay_off_the_screen_unless_verbose(tmp_path, offline_env):
    """No catalog in HOME and no way out (a proxy on a closed loopback port)."""
    env = offline_env
    exe = [str(Path(sys.executable).parent / "vicuna-sky"), "plan", "vicuna-7b", "--json"]

    def run(*extra):
        return subprocess.run(
            exe + list(extra), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    quiet = run()
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert len(quiet.stderr.strip().splitlines()) == 1
    assert "cannot read SkyPilot's catalog for gcp" in quiet.stderr
    loud = run("--verbose")
    assert loud.returncode == 2
    assert len((loud.stdout + loud.stderr).strip().splitlines()) > 1  # SkyPilot's own lines
