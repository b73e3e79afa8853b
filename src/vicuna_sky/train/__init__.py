"""FSDP2 fine-tuning with exact resume, preemption-safe checkpoints and HF export.

Entry point: `torchrun --nproc_per_node N -m vicuna_sky.train --model-path ... --data-path ...`.
"""
