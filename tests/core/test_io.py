import io
import os

import numpy as np
import pytest
from PIL import Image

from clipkit.core.errors import ImageLoadError
from clipkit.core.io import load_image, scan_images


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))                 # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                       # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60                    # the blue band is now on top


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "YCbCr"])
def test_modes_become_rgb(tmp_path, mode):
    im = Image.new("RGB", (16, 16), (200, 30, 30)).convert(mode)
    p = tmp_path / f"x_{mode}.tif"
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_palette_with_transparency_composited(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.info["transparency"] = 0                            # index 0 (red) is transparent
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    out = load_image(p, background=(0, 0, 0))
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == (0, 0, 0)


def test_rgba_composited_on_background(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 255, 0, 255))
    p = tmp_path / "a.png"
    im.save(p)
    out = np.asarray(load_image(p))
    assert tuple(out[0, 0]) == (0, 255, 0)
    assert tuple(out[5, 5]) == (255, 255, 255)             # transparent -> white background
    la = Image.new("LA", (4, 4), (100, 0))
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)


def test_16bit_greyscale_rescaled(tmp_path):
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    out = np.asarray(load_image(p))
    assert out.shape == (8, 8, 3)
    assert 120 <= out[0, 0, 0] <= 135                      # mid grey, not clipped to white


def test_decompression_bomb_guard(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(p)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(p, max_pixels=10_000)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"not an image at all", "not an image")])
def test_bad_files(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as e:
        load_image(p)
    assert e.value.path == str(p)


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_permissions(tmp_path):
    p = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(p)
    p.chmod(0)
    with pytest.raises(ImageLoadError, match="permission"):
        load_image(p)


def test_scan_images_recurses_and_survives_symlink_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "1.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "b" / "2.jpg")
    (tmp_path / "a" / "notes.txt").write_text("x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    found = scan_images([tmp_path])
    assert [p.name for p in found] == ["1.png", "2.jpg"]
