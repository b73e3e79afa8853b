import json
from pathlib import Path


def test_demo_completes_and_summarises(cli, tmp_path):
    workdir = tmp_path / "demo"
    out = cli("demo", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr
    assert "demo summary" in out.stdout
    assert (workdir / "tiny-llama" / "model.safetensors").is_file()
    data = workdir / "buckets" / "s3" / "vicuna-sky-tiny" / "data" / "demo_sharegpt.json"
    segments = json.loads(data.read_text())
    assert len(segments) >= 10
    # The bucket holds cleaned, split data: markdown with fenced code, no ChatGPT UI residue.
    text = json.dumps(segments)
    assert "```python" in text and "Copy code" not in text and "<div" not in text
    assert "trained on" in out.stdout
    # Training ran on the local backend, was preempted once and resumed from the bucket.
    assert "preempted after step" in out.stdout
    assert (workdir / "export" / "model.safetensors").is_file()
    logs = "".join(p.read_text() for p in workdir.glob("runs/*/attempt-*/run-rank0.log"))
    assert "emergency checkpoint" in logs and "resumed at step" in logs
    # The trained model answered through the fleet's OpenAI API.
    assert "3 questions answered" in out.stdout
    # sky/eval.yaml ran locally: both tiny models answered the demo questions, a judge (the
    # fine-tuned model itself, as no endpoint is configured) judged them, a report was written.
    evaluation = workdir / "buckets" / "s3" / "vicuna-sky-tiny" / "eval" / "vicuna-tiny" / "demo"
    for model in ("vicuna-tiny", "tiny-base"):
        answers = (evaluation / "answers" / f"{model}.jsonl").read_text().splitlines()
        assert len(answers) == 6 and all(
            len(json.loads(a)["choices"][0]["turns"]) == 2 for a in answers
        )
    assert len((evaluation / "judgments" / "single.jsonl").read_text().splitlines()) == 24
    assert len((evaluation / "judgments" / "pairwise.jsonl").read_text().splitlines()) == 12
    report = json.loads((evaluation / "report" / "report.json").read_text())
    assert report["judges"] == ["vicuna-tiny (local model)"] and report["reference"] == "tiny-base"
    assert "no judge endpoint configured" in " ".join(out.stdout.split())
    # Running it again reuses its own directory; a foreign non-empty one is refused.
    assert cli("demo", "--workdir", str(workdir)).returncode == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    refused = cli("demo", "--workdir", str(foreign))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert Path(foreign / "keep.txt").read_text() == "precious"
