import torch

from datamodules.augment import random_crop_flip


def test_random_crop_flip_keeps_shape_and_moves_pixels_per_image():
    torch.manual_seed(0)
    images = torch.rand(3, 10, 3, 12, 12)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape
    changed = (out != images).flatten(2).any(-1)
    assert changed.float().mean() > 0.5  # most images are shifted or flipped
    assert not torch.equal(out[0, 0], out[0, 1]) or not torch.equal(images[0, 0], images[0, 1])


def test_random_crop_flip_is_an_exact_shift_or_flip():
    torch.manual_seed(1)
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = set()
    for _ in range(200):
        out = random_crop_flip(image, padding=1)[0, 0]
        # every output is the padded image cropped at some offset, possibly flipped
        padded = torch.nn.functional.pad(image[0, 0], (1, 1, 1, 1))
        matches = [
            (dy, dx, f)
            for dy in range(3)
            for dx in range(3)
            for f in (False, True)
            if torch.equal(out, (padded[dy : dy + 4, dx : dx + 4].flip(1) if f else padded[dy : dy + 4, dx : dx + 4]))
        ]
        assert matches
        seen.update(matches)
    assert len(seen) >= 15  # all 18 offset x flip combinations turn up (some coincide)


def test_no_padding_no_flip_is_identity():
    images = torch.rand(2, 3, 1, 5, 5)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)
