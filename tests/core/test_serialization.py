"""Space-filling-curve codes: Morton / Hilbert values, bijections, locality, batch bits and the parent property."""

import itertools

import pytest
import torch

from gsstudio_ext.core.serialization import (
    CURVE_ORDERS,
    encode,
    hilbert_decode,
    hilbert_encode,
    morton_decode,
    morton_encode,
)


def _cube(side: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(side), repeat=3)), dtype=torch.long)


def test_z_order_of_a_2x2x2_grid_is_the_standard_interleave() -> None:
    grid = _cube(2)  # (0,0,0), (0,0,1), (0,1,0), ... x slowest
    assert morton_encode(grid, depth=1).tolist() == list(range(8))
    assert morton_encode(grid).tolist() == list(range(8))  # Morton codes do not depend on depth
    # x = 011, y = 101, z = 110 -> triples (0,1,1) (1,0,1) (1,1,0) = 3, 5, 6 -> 3*64 + 5*8 + 6.
    assert morton_encode(torch.tensor([[3, 5, 6]])).item() == 238
    assert morton_encode(torch.tensor([[65535, 65535, 65535]])).item() == (1 << 48) - 1


@pytest.mark.parametrize("depth", [3, 5, 16])
def test_hilbert_is_a_bijection_on_an_8x8x8_grid_with_unit_steps(depth: int) -> None:
    grid = _cube(8)
    codes = hilbert_encode(grid, depth=depth)
    # The curve fills the corner cube of side 8 first, whatever the depth: codes are exactly 0..511.
    assert sorted(codes.tolist()) == list(range(512))
    path = grid[torch.argsort(codes)]
    assert path[0].tolist() == [0, 0, 0]
    steps = (path[1:] - path[:-1]).abs().sum(1)
    assert steps.eq(1).all()
    assert torch.equal(hilbert_decode(codes, depth=depth), grid)


def test_round_trips_and_unit_steps_at_full_depth() -> None:
    torch.manual_seed(0)
    grid = torch.randint(0, 1 << 16, (20000, 3))
    assert torch.equal(morton_decode(morton_encode(grid)), grid)
    assert torch.equal(hilbert_decode(hilbert_encode(grid)), grid)
    codes = torch.randint(0, (1 << 48) - 1, (20000,))
    steps = (hilbert_decode(codes + 1) - hilbert_decode(codes)).abs().sum(1)
    assert steps.eq(1).all()
    # Z-order jumps: most consecutive codes are neighbours, but not all of them.
    z_steps = (morton_decode(codes + 1) - morton_decode(codes)).abs().sum(1)
    assert z_steps.gt(1).any()


def test_trans_variants_swap_x_and_y() -> None:
    torch.manual_seed(0)
    grid = torch.randint(0, 100, (500, 3))
    swapped = grid[:, [1, 0, 2]]
    assert torch.equal(encode(grid, "z-trans"), morton_encode(swapped))
    assert torch.equal(encode(grid, "hilbert-trans"), hilbert_encode(swapped))
    assert torch.equal(encode(grid, "hilbert"), hilbert_encode(grid))
    assert not torch.equal(encode(grid, "z"), encode(grid, "z-trans"))
    assert set(CURVE_ORDERS) == {"z", "z-trans", "hilbert", "hilbert-trans"}


def test_batch_index_sits_in_the_high_bits_and_groups_samples() -> None:
    torch.manual_seed(0)
    grid = torch.randint(0, 1 << 16, (1000, 3))
    batch = torch.randint(0, 5, (1000,))
    for order in CURVE_ORDERS:
        codes = encode(grid, order, batch=batch)
        assert torch.equal(codes >> 48, batch)
        assert torch.equal(codes & ((1 << 48) - 1), encode(grid, order))
        assert torch.equal(batch[torch.argsort(codes)], torch.sort(batch).values)
    small = encode(grid % 8, "hilbert", depth=3, batch=batch)
    assert torch.equal(small >> 9, batch)


@pytest.mark.parametrize("order", CURVE_ORDERS)
def test_code_shift_by_3_orders_the_parent_cells(order: str) -> None:
    grid = _cube(16)
    codes = encode(grid, order)
    parents = codes >> 3
    # Cells with the same parent code are exactly the 8 children of one stride-2 cell ...
    coarse = grid >> 1
    for p in parents.unique()[:50]:
        children = coarse[parents == p]
        assert children.shape[0] == 8 and children.eq(children[0]).all()
    # ... and, for the Hilbert orders, consecutive parent cells are neighbours again.
    unique, inverse = torch.unique(parents, return_inverse=True)
    path = torch.zeros(unique.numel(), 3, dtype=torch.long).index_copy_(0, inverse, coarse)
    steps = (path[1:] - path[:-1]).abs().sum(1)
    assert path.shape[0] == 512
    if order.startswith("hilbert"):
        assert steps.eq(1).all()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="lie in"):
        morton_encode(torch.tensor([[0, -1, 0]]))
    with pytest.raises(ValueError, match="lie in"):
        hilbert_encode(torch.tensor([[0, 8, 0]]), depth=3)
    with pytest.raises(TypeError):
        morton_encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown curve order"):
        encode(torch.zeros(2, 3, dtype=torch.long), "peano")
    with pytest.raises(ValueError, match="depth"):
        hilbert_encode(torch.zeros(2, 3, dtype=torch.long), depth=17)
