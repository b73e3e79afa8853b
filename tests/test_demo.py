import json
from pathlib import Path


def test_demo_completes_and_summarises(cli, tmp_path):
    workdir = tmp_path / "demo"
    out = cli("demo", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr
    assert "demo summary" in out.stdout
    assert (workdir / "tiny-llama" / "model.safetensors").is_file()
    data = workdir / "buckets" / "s3" / "vicuna-sky-tiny" / "data" / "demo_sharegpt.json"
    assert len(json.loads(data.read_text())) >= 10
    # Running it again reuses its own directory; a foreign non-empty one is refused.
    assert cli("demo", "--workdir", str(workdir)).returncode == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    refused = cli("demo", "--workdir", str(foreign))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert Path(foreign / "keep.txt").read_text() == "precious"
