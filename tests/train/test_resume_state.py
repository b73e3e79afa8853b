"""What a resumed run restores besides the weights, in process: the random generators, the
learning-rate schedule (a function of the step alone, restored from the scheduler's state) and
the count of tokens already trained on. tests/train/test_trainer.py holds whole torchrun runs to
bit-identical resumes; these are the parts, fast enough to run against every mutant."""

import math
import random

import pytest
import torch

from vicuna_sky.data.tokenize import Tokenized
from vicuna_sky.train.checkpoint import rng_state, set_rng_state
from vicuna_sky.train.config import TrainConfig, parse_args
from vicuna_sky.train.data import Dataset, ResumableSampler
from vicuna_sky.train.trainer import lr_lambda, tokens_before


def draws() -> tuple:
    return random.random(), random.getrandbits(64), torch.rand(4).tolist()


def test_the_rng_state_restores_python_and_torch_draws():
    state = rng_state()
    first = [draws() for _ in range(3)]
    set_rng_state(state)
    assert [draws() for _ in range(3)] == first
    assert ("cuda" in state) == torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_rng_state_restores_the_gpu_generator_too():
    state = rng_state()
    first = torch.rand(4, device="cuda").tolist()
    set_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == first
    cpu_only = {k: v for k, v in state.items() if k != "cuda"}
    set_rng_state(cpu_only)  # a checkpoint taken without a GPU resumes on one
    again = draws()
    set_rng_state(cpu_only)
    assert draws() == again


def config(scheduler: str, warmup_ratio: float) -> TrainConfig:
    """From a command line, as the trainer gets it (its strings are new ones, not literals)."""
    argv = ["--model-path=m", "--data-path=d", f"--lr-scheduler={scheduler}"]
    return parse_args([*argv, f"--warmup-ratio={warmup_ratio}"])


def test_warmup_is_a_linear_ramp_over_a_rounded_up_share_of_the_steps():
    # 10 % of 25 steps is 2.5: three warmup steps, at 1/3, 2/3 and 3/3 of the rate.
    for scheduler in ("constant", "linear", "cosine"):
        factor = lr_lambda(config(scheduler, 0.1), 25)
        assert [factor(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert factor(3) == 1.0


def test_the_schedules_after_warmup():
    constant = lr_lambda(config("constant", 0.1), 22)  # warmup 3 (2.2 rounded up), 19 after
    linear = lr_lambda(config("linear", 0.1), 22)
    cosine = lr_lambda(config("cosine", 0.1), 22)
    for step, progress in [(3, 0.0), (8, 5 / 19), (12, 9 / 19), (20, 17 / 19), (22, 1.0)]:
        assert constant(step) == 1.0
        assert linear(step) == pytest.approx(1 - progress)
        assert cosine(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    # Past the end (a run extended by hand): no negative rate, no cosine coming back up.
    assert linear(30) == 0.0 and cosine(30) == pytest.approx(0.0)


def test_no_warmup_and_all_warmup():
    linear = lr_lambda(config("linear", 0.0), 4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    for scheduler in ("linear", "cosine"):
        factor = lr_lambda(config(scheduler, 1.0), 4)
        assert [factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    # One step after warmup: it decays all the way in that step.
    last = lr_lambda(config("linear", 0.75), 4)
    assert [last(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("stop", [0, 1, 4, 9])
def test_a_resumed_scheduler_gives_the_same_rates(stop):
    def scheduler() -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config("cosine", 0.2), 12))

    def rates(s: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            s.optimizer.step()
            s.step()
            out.append(s.get_last_lr()[0])
        return out

    uninterrupted = rates(scheduler(), 12)
    first = scheduler()
    rates(first, stop)
    resumed = scheduler()
    resumed.load_state_dict(first.state_dict())
    assert rates(resumed, 12 - stop) == uninterrupted[stop:]


def test_tokens_before_counts_the_batches_trained_on():
    # 12 rows of 1..12 tokens (78 in all), 3 steps an epoch of 4 rows.
    rows = Dataset([Tokenized(list(range(n)), list(range(n))) for n in range(1, 13)])
    assert tokens_before(rows, 4, seed=5, steps=0) == 0
    assert tokens_before(rows, 4, seed=5, steps=3) == 78
    assert tokens_before(rows, 4, seed=5, steps=6) == 2 * 78
    first = ResumableSampler(12, 4, seed=5).next_batch()
    assert tokens_before(rows, 4, seed=5, steps=1) == sum(i + 1 for i in first)
    assert tokens_before(rows, 4, seed=6, steps=1) != tokens_before(rows, 4, seed=5, steps=1)
