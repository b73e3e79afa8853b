"""Validation loss and where metrics go, under real torchrun on CPU (2 processes, packed rows).

One run with evals every 2 steps (TensorBoard on, W&B offline) is the reference; a run without
evals and a run resumed from its bucket must end bit-identical to it.
"""

import json
import shutil

import pytest
import torch

from checkpoints_sync import Checkpoints, open_store

from .conftest import assert_identical, trainer_argv, weights

FIXTURES_DUMMY = "fastchat/dummy_conversation.json"


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """Conversations the training data (the first 64) does not hold."""
    from .conftest import FIXTURES

    samples = json.loads((FIXTURES / FIXTURES_DUMMY).read_text())[64:88]
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    path.write_text(json.dumps(samples))
    return path


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, tiny_model):
    """Attention dropout on: training draws random numbers every step, so an eval that moved
    any RNG state would change the trained weights."""
    path = tmp_path_factory.mktemp("dropout") / "tiny-llama"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.25}))
    return path


def args_for(bucket, model, train_data, eval_data=None) -> list[str]:
    evals = {"eval_path": eval_data, "eval_every_steps": 2} if eval_data is not None else {}
    return trainer_argv(
        bucket, model, train_data, packing="true", max_steps=4, metrics_upload_seconds=0, **evals
    )


WANDB_OFFLINE = {"WANDB_API_KEY": "local-test-key", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def with_evals(tmp_path_factory, dropout_model, train_data, eval_data):
    from .conftest import Run

    root = tmp_path_factory.mktemp("with-evals")
    args = args_for(root / "bucket", dropout_model, train_data, eval_data)
    run = Run(root / "node", args, 2, env=WANDB_OFFLINE)
    assert run.wait() == 0, run.output()[-3000:]
    return run


def test_eval_loss_equals_an_independent_full_forward(with_evals, dropout_model, eval_data):
    """The trainer's number (2 ranks, packed rows, FSDP) against a plain forward of each
    conversation on its own with transformers, summed in float64 over the answer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna_sky.data.conversation import get_template
    from vicuna_sky.data.tokenize import IGNORE_INDEX, tokenize_sample

    metrics = with_evals.metrics()
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert sorted(evals) == [0, 2, 4]  # before the first step, every 2 steps, after the last
    assert "loss" not in metrics[0]  # step 0 is the base model's eval alone

    tokenizer = AutoTokenizer.from_pretrained(dropout_model)
    template = get_template("vicuna_v1.1", tokenizer)
    samples = [
        tokenize_sample(s, template, tokenizer, 128) for s in json.loads(eval_data.read_text())
    ]

    def full_forward(model_dir) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for s in samples:
                labels = torch.tensor(s.labels[1:])
                if not (labels != IGNORE_INDEX).any():
                    continue
                logits = model(torch.tensor([s.input_ids])).logits[0, :-1].double()
                total += torch.nn.functional.cross_entropy(
                    logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                count += int((labels != IGNORE_INDEX).sum())
        assert count == metrics[0]["eval_tokens"]
        return total / count

    assert evals[0] == pytest.approx(full_forward(dropout_model), rel=1e-5)
    assert evals[4] == pytest.approx(full_forward(with_evals.cwd / "export"), rel=1e-5)
    assert evals[4] < evals[0]


def test_evals_change_no_rng_and_no_data_order(with_evals, run_trainer, tmp_path, dropout_model,
                                               train_data):  # fmt: skip
    plain = run_trainer(tmp_path / "node", args_for(tmp_path / "bucket", dropout_model, train_data))
    assert plain.wait() == 0, plain.output()[-3000:]
    assert not any("eval_loss" in m for m in plain.metrics())
    assert_identical(weights(plain.cwd / "export"), weights(with_evals.cwd / "export"))


def test_resume_with_evals_is_exact_and_the_curve_marks_it(
    with_evals, run_trainer, tmp_path, dropout_model, train_data, eval_data
):
    from vicuna_sky.train.metrics import LOSS_CURVE, history

    # Another machine, the same bucket as the reference run had after step 2: step 4 lost.
    bucket = tmp_path / "bucket"
    shutil.copytree(with_evals.cwd.parent / "bucket", bucket)
    shutil.rmtree(bucket / "ckpt" / "step-4")
    (bucket / "ckpt" / LOSS_CURVE).unlink()
    run = run_trainer(
        tmp_path / "zone-b", args_for(bucket, dropout_model, train_data, eval_data), env=None
    )
    assert run.wait() == 0, run.output()[-3000:]
    assert "resumed at step 2" in run.output()
    assert_identical(weights(run.cwd / "export"), weights(with_evals.cwd / "export"))
    # The bucket's history: two attempts; the second redid steps 3 and 4 and its eval at 4 is
    # the reference's to the bit.
    runs = history(f"file://{bucket}/ckpt")
    assert [len(a) for a in runs.attempts] == [5, 2] and runs.preemptions == 1
    train, evals, resumes = runs.kept()
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["eval_loss"] == with_evals.metrics()[-1]["eval_loss"]
    assert resumes == [train[1]["tokens_seen"]]
    png = (bucket / "ckpt" / LOSS_CURVE).read_bytes()
    assert png.startswith(b"\x89PNG") and png == (run.cwd / LOSS_CURVE).read_bytes()
    # Preempted after its last step (an emergency checkpoint at the end): the next attempt has
    # nothing to train, and still owes the final model's eval loss.
    last = run_trainer(tmp_path / "zone-c", args_for(bucket, dropout_model, train_data, eval_data))
    assert last.wait() == 0, last.output()[-3000:]
    assert "resumed at step 4" in last.output()
    [owed] = last.metrics()
    assert owed["step"] == 4 and owed["eval_loss"] == evals[-1]["eval_loss"]
    assert history(f"file://{bucket}/ckpt").kept()[2] == [*resumes, train[-1]["tokens_seen"]]


def test_tensorboard_files_read_by_tensorboard(with_evals):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [local] = (with_evals.cwd / "tensorboard").iterdir()
    bucket = with_evals.cwd.parent / "bucket" / "ckpt" / "tensorboard" / local.name
    for folder in (local, bucket):  # the bucket holds the same event files
        events = EventAccumulator(str(folder))
        events.Reload()
        train = events.Scalars("train/loss")
        evals = events.Scalars("eval/loss")
        assert [e.step for e in train] == [1, 2, 3, 4]
        assert [e.step for e in evals] == [0, 2, 4]
        losses = [m["loss"] for m in with_evals.metrics() if "loss" in m]
        assert [e.value for e in train] == pytest.approx(losses, rel=1e-6)


def test_wandb_offline_run_directory_is_written(with_evals):
    [run] = (with_evals.cwd / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))
    assert "wandb sync" in with_evals.output()  # offline: nothing was sent


def test_a_broken_wandb_leaves_training_alone(run_trainer, trainer_args, tmp_path):
    """W&B online against a closed port (its crash reports off): one warning, and the run ends
    as it would have."""
    env = {
        "WANDB_API_KEY": "local-test-key",
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_ERROR_REPORTING": "false",
    }
    run = run_trainer(tmp_path / "node", trainer_args(max_steps=2), nproc=1, env=env)
    assert run.wait() == 0, run.output()[-3000:]
    assert "wandb switched off" in run.output()
    assert [m["step"] for m in run.metrics()] == [1, 2]
    assert Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt")).committed() == [2]
