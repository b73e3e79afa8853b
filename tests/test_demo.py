import json
from pathlib import Path


def test_demo_completes_and_summarises(cli, tmp_path):
    """The demo's stages on the tiny recipe (the default, SmolLM2, runs the same code with a real
    model in a few minutes: `make demo`)."""
    workdir = tmp_path / "demo"
    out = cli("demo", "--workdir", str(workdir), "--recipe", "tiny-cpu")
    assert out.returncode == 0, out.stderr
    assert "demo summary" in out.stdout
    assert (workdir / "models" / "tiny-llama" / "model.safetensors").is_file()
    # Uploaded by content, as `train` uploads a user's file.
    (data,) = (workdir / "buckets" / "s3" / "vicuna-sky-tiny" / "data").glob(
        "sha256-*/demo_sharegpt.json"
    )
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
    # The trained model answered through the fleet's OpenAI API; the summary quotes it.
    text = " ".join(out.stdout.split())
    assert "3 questions answered" in text
    assert '"What is the capital of France?" -> "' in text
    # sky/eval.yaml ran locally: both tiny models answered the demo questions, a judge (the
    # fine-tuned model itself, as no endpoint is configured) judged them, a report was written.
    evaluation = workdir / "buckets" / "s3" / "vicuna-sky-tiny" / "eval" / "vicuna-tiny" / "demo"
    for model in ("vicuna-tiny", "tiny-base"):
        answers = (evaluation / "answers" / f"{model}.jsonl").read_text().splitlines()
        assert len(answers) == 6 and all(
            len(json.loads(a)["choices"][0]["turns"]) == 2 for a in answers
        )
    judgments = {
        mode: [json.loads(x) for x in (evaluation / "judgments" / f"{mode}.jsonl").open()]
        for mode in ("single", "pairwise")
    }
    assert len(judgments["single"]) == 24 and len(judgments["pairwise"]) == 12
    # The local judge's verdicts are constrained to the allowed strings: every one is readable.
    assert all(j["error"] is None for js in judgments.values() for j in js)
    assert "36 of 36 verdicts readable" in text and "not a quality measure" in text
    report = json.loads((evaluation / "report" / "report.json").read_text())
    assert report["judges"] == ["vicuna-tiny (local model)"] and report["reference"] == "tiny-base"
    assert all(1 <= m["overall"] <= 10 for m in report["models"].values())
    assert {p.name for p in (evaluation / "report").glob("*.png")} >= {"scores_by_category.png"}
    assert "no judge endpoint configured" in text
    # The fine-tuned model as a GGUF file for llama.cpp.
    assert list((workdir / "gguf").glob("*.q8_0.gguf"))
    # The blog's chart, from the published reviews.
    assert (workdir / "blog" / "relative_quality.png").stat().st_size > 10_000
    assert "vicuna-13b 92%" in text and "llama-13b 68%" in text
    # A foreign non-empty directory is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    refused = cli("demo", "--workdir", str(foreign))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert Path(foreign / "keep.txt").read_text() == "precious"


def test_a_rerun_clears_its_outputs_and_keeps_the_model(tmp_path, monkeypatch):
    """The rerun, in-process and with the first stage only (the whole demo ran above)."""
    from vicuna_sky import demo

    monkeypatch.setattr(demo, "STAGES", demo.STAGES[:1])
    workdir = tmp_path / "demo"
    demo.run(workdir, "tiny-cpu")
    model = workdir / "models" / "tiny-llama" / "model.safetensors"
    made = model.stat().st_mtime_ns
    (workdir / "export").mkdir()
    (workdir / "export" / "old.txt").write_text("from the last run")
    outputs: list[str] = []
    monkeypatch.setattr(
        demo.console, "print", lambda *a, **k: outputs.append(" ".join(map(str, a)))
    )
    demo.run(workdir, "tiny-cpu")
    assert any("(cached)" in line for line in outputs)
    assert model.stat().st_mtime_ns == made and not (workdir / "export").exists()
