"""The trainer under real torchrun on CPU (gloo, FSDP2): learning, labels, resume, preemption."""

import json
import re
import shutil
import signal

import pytest
import torch

from checkpoints_sync import Checkpoints, open_store
from vicuna_sky.spot import PREEMPTED_EXIT_CODE

from .conftest import assert_identical, weights


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, train_data):
    """The reference: 14 steps on 2 processes, never stopped."""
    from .conftest import Run

    root = tmp_path_factory.mktemp("reference")
    bucket = root / "bucket"
    args = [
        "--model-path",
        str(tiny_model),
        "--data-path",
        str(train_data),
        "--max-length",
        "128",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0.1",
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "2",
        "--precision",
        "fp32",
        "--checkpoint-every-steps",
        "2",
        "--seed",
        "0",
        "--checkpoint-url",
        f"file://{bucket}/ckpt",
        "--export-url",
        f"file://{bucket}/model",
    ]
    run = Run(root / "node", args, 2)
    assert run.wait() == 0, run.output()[-3000:]
    return run


def test_loss_decreases_and_export_generates(uninterrupted, tiny_model, train_data):
    metrics = uninterrupted.metrics()
    # 58 of the 64 conversations keep an answer token within 128 tokens: 7 steps per epoch.
    assert [m["step"] for m in metrics] == list(range(1, 15))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first * 0.8, (first, last)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = uninterrupted.cwd / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("USER: Who are you? ASSISTANT:")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # The export holds the trained weights: it predicts a training answer better than the base.
    sample = json.loads(train_data.read_text())[0]["conversations"]
    chat = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in sample[:2]]  # fmt: skip
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :128]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        trained_loss, base_loss = (m(ids, labels=ids).loss.item() for m in (model, base))
    assert trained_loss < base_loss * 0.95, (trained_loss, base_loss)  # 5.7 vs 6.3 (ln 512)
    # The bucket holds the same export and the committed checkpoints (retention keeps two).
    bucket = uninterrupted.cwd.parent / "bucket"
    assert (bucket / "model" / "model.safetensors").read_bytes() == (
        export / "model.safetensors"
    ).read_bytes()
    assert Checkpoints(open_store(f"file://{bucket}/ckpt")).committed() == [12, 14]


def test_sigkill_in_epoch_two_and_restart_elsewhere_is_bit_identical(
    uninterrupted, run_trainer, trainer_args, tmp_path, until
):
    """Killed in the middle of the second epoch (7 steps an epoch, checkpoints every 2: it
    resumes at step 10 or 12), the run ends identical to one never stopped: the data order
    of a later epoch, the scheduler and the RNG come back too (issue #30)."""
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    first = run_trainer(tmp_path / "zone-a", trainer_args())
    until(lambda: (cps.latest() or 0) >= 10 or first.proc.poll() is not None)
    assert first.proc.poll() is None, "the run ended before it could be killed"
    first.signal_group(signal.SIGKILL)
    first.wait()
    # Another zone: an empty local disk, the same bucket.
    second = run_trainer(tmp_path / "zone-b", trainer_args())
    assert second.wait() == 0, second.output()[-3000:]
    resumed = re.search(r"resumed at step (\d+)", second.output())
    assert resumed and int(resumed[1]) in (10, 12), second.output()[-3000:]
    assert_identical(weights(second.cwd / "export"), weights(uninterrupted.cwd / "export"))


def test_gcp_notice_saves_and_exits_75(run_trainer, trainer_args, tmp_path, until, metadata_server):
    env = metadata_server.env("gcp")
    args = trainer_args(checkpoint_every_steps=100, preemption_poll_seconds=0.05)
    run = run_trainer(tmp_path / "node", args, env=env)
    metrics = run.cwd / "metrics.jsonl"
    until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    metadata_server.notice()
    run.wait()
    out = run.output()
    assert "notice (gcp)" in out and "window 30s" in out
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in out  # each worker's status, as torchrun saw it
    [step] = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt")).committed()
    assert (run.cwd / "checkpoints" / "PREEMPTED").read_text().strip() == f"step {step}"


def test_sigterm_saves_and_resumes_on_one_process(
    uninterrupted, run_trainer, trainer_args, tmp_path, until
):
    args = trainer_args(checkpoint_every_steps=100)  # only the emergency checkpoint
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    first = run_trainer(tmp_path / "node", args)
    metrics = first.cwd / "metrics.jsonl"
    until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    first.signal_group(signal.SIGTERM)
    first.wait()
    out = first.output()
    # torchrun forwards SIGTERM to the workers, which finish the step and save before exiting.
    assert "notice (sigterm)" in out and "emergency checkpoint" in out
    [step] = cps.committed()
    assert 3 <= step < 14
    assert (first.cwd / "checkpoints" / "PREEMPTED").read_text().strip() == f"step {step}"
    # Resume with half the processes: DCP reshards the 2-process checkpoint.
    second = run_trainer(tmp_path / "smaller", args, nproc=1)
    assert second.wait() == 0, second.output()[-3000:]
    assert f"resumed at step {step}" in second.output()
    assert json.loads((second.cwd / "export" / "config.json").read_text())["num_hidden_layers"] == 2
    final = weights(second.cwd / "export")
    reference = weights(uninterrupted.cwd / "export")
    for name in reference:  # another world size sums in another order: close, not identical
        torch.testing.assert_close(final[name], reference[name], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, tiny_model):
    """The tiny Llama with attention dropout: training draws random numbers every step, so a
    resume that does not restore every rank's RNG state diverges."""
    import shutil

    path = tmp_path_factory.mktemp("dropout") / "tiny-llama"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.25}))
    return path


def test_corrupt_newest_bucket_checkpoint_resumes_from_the_one_before_identically(
    run_trainer, trainer_args, tmp_path, dropout_model
):
    args = trainer_args(model_path=dropout_model, max_steps=4)
    first = run_trainer(tmp_path / "zone-a", args)
    assert first.wait() == 0, first.output()[-3000:]
    assert "attention sdpa" in first.output()
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    assert cps.committed() == [2, 4]
    # The newest checkpoint's largest shard is damaged in the bucket (bit rot, a bad copy).
    shard = max(cps.read_manifest(4).files, key=lambda f: f.size).path
    damaged = tmp_path / "bucket" / "ckpt" / "step-4" / shard
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # Another zone, an empty disk: step-4 fails verification, step-2 is the newest good one.
    second = run_trainer(tmp_path / "zone-b", args)
    assert second.wait() == 0, second.output()[-3000:]
    out = second.output()
    assert "cannot use step-4" in out and "resumed at step 2" in out
    # Steps 3 and 4 again, with the same dropout masks: bit-identical to the run that did them.
    assert_identical(weights(second.cwd / "export"), weights(first.cwd / "export"))


def conversations(question: str, answer: str, trailing: str) -> list[dict]:
    return [
        {
            "id": f"s{i}",
            "conversations": [
                {"from": "human", "value": f"{question} #{i}"},
                {"from": "gpt", "value": f"{answer} number {i}."},
                {"from": "human", "value": trailing * (i + 1)},
            ],
        }
        for i in range(8)
    ]


def test_only_answer_tokens_carry_loss(run_trainer, trainer_args, tmp_path):
    """A trailing question comes after every answer, so causally it cannot change how the
    answers are predicted: if the loss moves when it changes, human tokens carry loss."""
    losses = {}
    variants = {
        "base": ("Tell me a fact", "Water boils at 100 degrees", "And why?"),
        "other question text": (
            "Tell me a fact",
            "Water boils at 100 degrees",
            "Something else entirely, much longer than before: ",
        ),
        "other answer text": ("Tell me a fact", "Ice melts at zero degrees", "And why?"),
    }
    for name, texts in variants.items():
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps(conversations(*texts)))
        args = trainer_args(tmp_path / name / "bucket", data_path=data, max_steps=1)
        run = run_trainer(tmp_path / name, args, nproc=1)
        assert run.wait() == 0, run.output()[-3000:]
        losses[name] = run.metrics()[0]["loss"]
    assert losses["other question text"] == pytest.approx(losses["base"], rel=1e-6)
    assert losses["other answer text"] != pytest.approx(losses["base"], rel=1e-3)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, tiny_model):
    """The tiny Llama with its output head tied to the embedding, as SmolLM2's is."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tied") / "tiny-llama"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    state = weights(path)
    del state["lm_head.weight"]  # a tied model stores it once, as the embedding
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_lora_trains_checkpoints_only_what_trains_and_resumes_identically(
    run_trainer, trainer_args, tmp_path, tied_model
):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    args = trainer_args(lora_r=4, max_steps=4, model_path=tied_model)
    first = run_trainer(tmp_path / "zone-a", args, nproc=1)
    assert first.wait() == 0, first.output()[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(first.cwd / "export")
    base = AutoModelForCausalLM.from_pretrained(tied_model)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])  # LoRA merged in
    for frozen in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        assert torch.equal(merged.state_dict()[frozen], base.state_dict()[frozen])
    # The checkpoints hold the adapters (and their optimizer state), not the frozen base model:
    # no base weight under any of its names (the tied output head included).
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    assert cps.committed() == [2, 4]
    saved = dcp.FileSystemReader(str(tmp_path / "bucket" / "ckpt" / "step-4")).read_metadata()
    weights_saved = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert weights_saved and all(".lora_" in k for k in weights_saved), weights_saved
    stored = sum(f.size for f in cps.read_manifest(4).files)
    assert stored < (tied_model / "model.safetensors").stat().st_size / 4, stored
    # Resumed from step 2 on another machine (step-4 lost), the base weights come from the
    # model and the adapters from the checkpoint: the same export, bit for bit.
    shutil.rmtree(tmp_path / "bucket" / "ckpt" / "step-4")
    second = run_trainer(tmp_path / "zone-b", args, nproc=1)
    assert second.wait() == 0, second.output()[-3000:]
    assert "resumed at step 2" in second.output()
    assert_identical(weights(second.cwd / "export"), weights(first.cwd / "export"))


def test_bad_arguments_are_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vicuna_sky.train",
            "--model-path",
            "tiny-llama",
            "--data-path",
            str(tmp_path / "missing.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "missing.json: no such file" in result.stderr and "Traceback" not in result.stderr


def test_two_nodes_commit_one_checkpoint_together(run_trainer, trainer_args, tmp_path):
    """Two "machines" (separate directories, one process each) train as one world of 2: each
    uploads its own shards and the manifest lists both; one machine then resumes from it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = trainer_args(max_steps=4)
    nodes = [
        run_trainer(
            tmp_path / f"node{rank}",
            args,
            nproc=1,
            launcher=[
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
            ],
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        assert node.wait() == 0, node.output()[-3000:]
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    assert cps.committed() == [2, 4]
    files = {f.path for f in cps.read_manifest(4).files}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files
    assert not (tmp_path / "node1" / "checkpoints" / "step-4" / ".metadata").exists()
    resumed = run_trainer(tmp_path / "single", trainer_args(max_steps=6), nproc=2)
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert "resumed at step 4" in resumed.output()
