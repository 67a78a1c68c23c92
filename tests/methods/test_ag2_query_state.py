import torch

from gsstudio_ext.methods.base.queries import QueryState


def test_query_state_undo_restores_selections_in_order_and_keeps_a_bounded_history() -> None:
    state = QueryState(max_undo=3)
    assert not state.undo() and state.selection is None
    masks = [torch.tensor([i % 2 == 0, i % 3 == 0]) for i in range(6)]
    for index, mask in enumerate(masks):
        state.push(mask, torch.full((2,), float(index)))
    assert len(state.history) == 3
    for expected in (4, 3, 2):
        assert state.undo()
        assert torch.equal(state.selection, masks[expected]) and float(state.relevancy[0]) == expected
    assert not state.undo()  # older steps were dropped
