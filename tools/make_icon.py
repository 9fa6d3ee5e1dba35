"""docs/icon.png: the Registry icon, a 6x6 token map in the paper's four state colours (a refinement front
sweeping the map: kept values behind it, fresh fills on it, one erased value, random blanks ahead)."""
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import the library's colours
from grn_core.sampler.states import STATE_COLOURS  # noqa: E402

FILL, KEEP, ERASE, BLANK = STATE_COLOURS
SIZE, N, MARGIN, GAP = 256, 6, 20, 8
LAYOUT = [  # K keep, F fill, E erase, B blank
    "KKKKFB",
    "KKKFBB",
    "KKEFBB",
    "KFFBBB",
    "FFBBBB",
    "BBBBBF",
]
COLOURS = {"K": KEEP, "F": FILL, "E": ERASE, "B": BLANK}

scale = 4  # draw large, downsample for smooth rounded corners
s = SIZE * scale
image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
draw = ImageDraw.Draw(image)
draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=40 * scale, fill=(32, 36, 44, 255))
cell = (s - 2 * MARGIN * scale - (N - 1) * GAP * scale) / N
for row, line in enumerate(LAYOUT):
    for col, key in enumerate(line):
        x0 = MARGIN * scale + col * (cell + GAP * scale)
        y0 = MARGIN * scale + row * (cell + GAP * scale)
        draw.rounded_rectangle((x0, y0, x0 + cell, y0 + cell), radius=8 * scale, fill=COLOURS[key] + (255,))
out = sys.argv[1] if len(sys.argv) > 1 else "docs/icon.png"
image.resize((SIZE, SIZE), Image.LANCZOS).save(out, optimize=True)
