import torch

from gsstudio_ext.core.palette import id_colors


def test_id_colors_are_stable_distinct_and_grey_for_unassigned() -> None:
    ids = torch.arange(-1, 50)
    colors = id_colors(ids)
    assert colors.shape == (51, 3) and colors.min() >= 0 and colors.max() <= 1
    assert torch.equal(colors[0], torch.full((3,), 0.5))
    assert torch.equal(id_colors(torch.tensor([7, 3])), colors[[8, 4]])  # same id, same colour
    neighbours = (colors[2:] - colors[1:-1]).abs().amax(dim=1)
    assert neighbours.min() > 0.1  # consecutive ids are easy to tell apart
    # HSV reference values: id 0 has hue 0 -> pure red tone.
    assert torch.allclose(id_colors(torch.tensor([0]))[0], torch.tensor([0.95, 0.95 * 0.35, 0.95 * 0.35]))
