"""Generate a tiny fake Omniglot in the official zip layout (run from this folder).

images_background/<Alphabet>/characterNN/IIII_DD.png and the same for images_evaluation:
105x105 1-bit PNGs, 20 drawers per character. The alphabets are real ones so that the Vinyals
split puts characters in train (Latin, Greek, Gurmukhi/character01), val (Hebrew, Bengali) and
test (Gurmukhi/character42-43, Kannada).
"""

from __future__ import annotations

import io
import random
import sys
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw

CHARACTERS = {
    "images_background": {"Latin": [1, 2, 3], "Greek": [1, 2], "Hebrew": [1, 2], "Bengali": [1]},
    "images_evaluation": {"Gurmukhi": [1, 42, 43], "Kannada": [1, 2]},
}
DRAWERS = 20


def drawing(seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        draw.line([(rng.randint(10, 95), rng.randint(10, 95)) for _ in range(3)], fill=0, width=4)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    char_id = 0
    for name, alphabets in CHARACTERS.items():
        with zipfile.ZipFile(root / f"{name}.zip", "w") as archive:
            for alphabet, numbers in alphabets.items():
                for number in numbers:
                    char_id += 1
                    for drawer in range(1, DRAWERS + 1):
                        path = f"{name}/{alphabet}/character{number:02d}/{char_id:04d}_{drawer:02d}.png"
                        archive.writestr(path, drawing(char_id * 100 + drawer))


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
