"""The trainer's data order: a resumed sampler gives exactly the batches the uninterrupted one
would have, wherever it stopped."""

import json

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.train.data import ResumableSampler


@pytest.mark.parametrize("stop", [0, 3, 7, 10, 16, 23])  # epoch starts, middles, later epochs
def test_a_resumed_sampler_continues_the_same_order(stop):
    reference = ResumableSampler(60, 8, seed=3)  # 7 steps an epoch, 4 samples dropped
    batches = [reference.next_batch() for _ in range(30)]
    first = ResumableSampler(60, 8, seed=3)
    for _ in range(stop):
        first.next_batch()
    resumed = ResumableSampler(60, 8, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_batch() for _ in range(30 - stop)] == batches[stop:]
    # Each epoch is a new order of whole batches, each sample at most once in an epoch.
    epochs = [[i for batch in batches[e * 7 : (e + 1) * 7] for i in batch] for e in range(4)]
    assert all(len(set(e)) == 56 for e in epochs) and len({tuple(e) for e in epochs}) == 4


def test_a_checkpoint_of_other_data_or_batch_is_refused():
    state = ResumableSampler(60, 8, seed=3).state_dict()
    for other in (
        ResumableSampler(61, 8, 3),
        ResumableSampler(60, 4, 3),
        ResumableSampler(60, 8, 4),
    ):
        with pytest.raises(VicunaSkyError, match="resume with the same data"):
            other.load_state_dict(state)


def test_the_order_of_a_seed_is_pinned():
    """A relaunched node may install a newer release of this package than the one that wrote
    the checkpoint: the order is a fixed function of (seed, epoch), the same in every release,
    so the resumed run continues the order the checkpoint was in."""
    for seed, batches in [
        (3, [[4, 5, 0, 1], [2, 8, 3, 6], [1, 9, 5, 6], [4, 3, 8, 0]]),
        (0, [[4, 1, 7, 5], [3, 9, 0, 8], [5, 6, 1, 2], [0, 8, 9, 3]]),
    ]:
        sampler = ResumableSampler(10, 4, seed=seed)  # 2 steps an epoch
        assert [sampler.next_batch() for _ in range(4)] == batches


def test_an_epoch_is_the_whole_batches_that_fit():
    assert ResumableSampler(60, 8, seed=3).steps_per_epoch == 7
    assert ResumableSampler(8, 8, seed=3).steps_per_epoch == 1
    with pytest.raises(VicunaSkyError, match=r"^7 training samples cannot fill one global batch"):
        ResumableSampler(7, 8, seed=3)


def test_a_state_read_back_from_a_checkpoint_resumes_at_any_size():
    """The state comes back from the checkpoint file as new int objects (past CPython's small
    ints: a real dataset's size), and must still match this run's settings."""
    first = ResumableSampler(1000, 300, seed=1234)
    first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ResumableSampler(1000, 300, seed=1234)
    resumed.load_state_dict(state)
    assert resumed.next_batch() == first.next_batch()
