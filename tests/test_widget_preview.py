"""The RGB preview sheet of the widget event: lossless while small, JPEG when large, always within the size cap."""

import base64
import io

import numpy
import torch
from PIL import Image

from grn_nodes.widget_events import LOSSLESS_SHEET_PIXELS, MAX_EVENT_BYTES, build_step_event, event_size, preview_sheet


def _pixels(sheet: dict) -> torch.Tensor:
    with Image.open(io.BytesIO(base64.b64decode(sheet["data"]))) as image:
        return torch.from_numpy(numpy.array(image.convert("RGB"), dtype=numpy.int16))


def _cells(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Every latent cell its own saturated colour: what JPEG smears across cells and frames."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (t, 3, h, w), generator=g).float() * 2 - 1


def test_a_small_sheet_is_png_and_keeps_every_cell_colour():
    rgb = _cells(3, 4, 4)  # the tiny model's 32x32, 9 frames: 3 latent frames of 4x4 cells
    sheet = preview_sheet(rgb)
    assert sheet["mime"] == "image/png" and sheet["tile"] == [4, 4] and sheet["cols"] == 2
    pixels = _pixels(sheet)
    assert pixels.shape == (8, 8, 3)
    for i in range(3):
        r, c = divmod(i, 2)
        expected = ((rgb[i] + 1) * 127.5).round().to(torch.int16).permute(1, 2, 0)
        assert torch.equal(pixels[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4], expected)


def test_a_large_sheet_is_jpeg():
    rgb = torch.rand(9, 3, 30, 53) * 2 - 1  # 480x848, 33 frames
    sheet = preview_sheet(rgb)
    assert sheet["mime"] == "image/jpeg" and sheet["tile"] == [53, 30]
    assert 3 * 30 * 3 * 53 > LOSSLESS_SHEET_PIXELS


def test_the_event_with_a_preview_stays_under_the_cap():
    rgb = torch.rand(21, 3, 45, 80) * 2 - 1  # a long 720p clip: the sheet must shrink to fit
    event = build_step_event(node="1", prompt_id=None, step=0, total=50, planned=50, entropy=0.5, kept=0.1,
                             guided=True, counts=(1, 2, 3, 4), token_states=torch.zeros(21, 45, 80, dtype=torch.uint8),
                             preview_rgb=rgb)
    assert event["preview"] is not None and event_size(event) <= MAX_EVENT_BYTES


def test_an_edit_event_with_its_fixed_map_and_a_preview_stays_under_the_cap():
    from grn_nodes.widget_events import FIXED_COLOUR, unpack_bit_map

    fixed = torch.rand(21, 45, 80) > 0.5
    event = build_step_event(node="1", prompt_id=None, step=0, total=50, planned=50, entropy=0.5, kept=0.1,
                             guided=True, counts=(1, 2, 3, 4), token_states=torch.zeros(21, 45, 80, dtype=torch.uint8),
                             preview_rgb=torch.rand(21, 3, 45, 80) * 2 - 1, fixed_cells=fixed)
    assert event_size(event) <= MAX_EVENT_BYTES and event["fixed_colour"] == list(FIXED_COLOUR)
    shape = (event["fixed"]["t"], event["fixed"]["h"], event["fixed"]["w"])
    assert shape == (event["map"]["t"], event["map"]["h"], event["map"]["w"]) == (21, 45, 64)
    assert unpack_bit_map(event["fixed"]["data"], shape).shape == shape
