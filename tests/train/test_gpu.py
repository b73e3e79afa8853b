"""On a machine with a CUDA GPU only (skipped elsewhere, with the reason): the trainer's GPU
path, under torchrun, on the tiny Llama: flex_attention with the document mask for packed rows,
bf16, fused AdamW, and no operation in a step that makes the host wait for the device."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_packed_bf16_steps_never_wait_for_the_gpu(run_trainer, trainer_args, tmp_path):
    args = trainer_args(
        packing="true",
        precision="bf16",
        max_steps=8,
        max_length=256,
        checkpoint_every_steps=100,
        final_checkpoint="false",
        export_dir="",
    )
    run = run_trainer(tmp_path / "gpu", args, nproc=1, env={"VICUNA_SKY_SYNC_DEBUG": "1"})
    assert run.wait() == 0, run.output()[-3000:]
    out = run.output()
    assert "attention flex_attention, torch.bfloat16 on cuda x1" in out
    assert "called a synchronizing CUDA operation" not in out, out[-6000:]
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    assert metrics[-1]["loss"] < metrics[0]["loss"]
