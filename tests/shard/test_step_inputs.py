"""`StepInputs` (shard/step_inputs.py): a decode step's inputs packed into one buffer, copied once, and
viewed back with their dtypes and shapes; staged writes and actions run after the copy."""

from __future__ import annotations

import torch

from entropyinfer.shard.step_inputs import StepInputs

CPU = torch.device("cpu")


def test_parts_come_back_with_their_values_dtypes_and_shapes_in_one_copy() -> None:
    inputs = StepInputs(CPU, copies=True)
    lengths = [torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32) + 10 * i for i in range(3)]
    dst = torch.zeros(2, 5, dtype=torch.int32)
    order: list[str] = []
    for step in range(3):
        inputs.begin()
        a = inputs.longs([7 + step, 1 << 40])
        b = inputs.stack(lengths, dim=1)
        inputs.write(dst[:, 1:4], [[step, 2, 3], [4, 5, 6]])
        inputs.after_upload(lambda: order.append(f"after {int(dst[0, 1])}"))
        c = inputs.longs([])
        views = inputs.upload()
        assert views[a].dtype == torch.int64 and views[a].tolist() == [7 + step, 1 << 40]
        assert views[b].dtype == torch.int32 and torch.equal(views[b], torch.stack(lengths, dim=1))
        assert views[c].shape == (0,)
        assert dst[:, 1:4].tolist() == [[step, 2, 3], [4, 5, 6]] and dst[:, 0].tolist() == [0, 0]
    assert inputs.uploads == 3 and order == ["after 0", "after 1", "after 2"]


def test_a_steps_views_survive_the_next_step_and_buffers_grow() -> None:
    inputs = StepInputs(CPU, copies=True)
    inputs.begin()
    inputs.longs([1, 2, 3])
    (one,) = inputs.upload()
    inputs.begin()
    inputs.longs(list(range(1000)))  # larger than the first buffer
    (two,) = inputs.upload()
    assert one.tolist() == [1, 2, 3] and two.tolist() == list(range(1000))


def test_on_the_cpu_nothing_is_copied() -> None:
    inputs = StepInputs(CPU)
    inputs.begin()
    inputs.longs([5])
    (view,) = inputs.upload()
    assert view.tolist() == [5] and inputs.uploads == 0
