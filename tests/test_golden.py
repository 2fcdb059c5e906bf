"""Golden output slices: a few numbers of what the scorer, pixel and latent guidance and captioning
produce with tiny seeded models (tests/golden_cases.py). Recorded before the architecture refactor of
issue 13 and kept unchanged after it: a refactor that changes any output fails here."""
import pytest

import golden_cases as g
from helpers import make_sd_components, save_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# recorded with `python tests/golden_cases.py` in the commit that added this file, before the refactor;
# PIXEL's first two cases (guided by the bundled `shapes-noised`) re-recorded when that guide's
# weights were retrained (the fuller image-tower overlay) (the code did not change: the third case, guided by `shapes`, did not)
SCORER = [0.15372, 0.40728, 0.07136, 0.16944, 12.493]
PIXEL = [6.2165, 8, 6, 2, 138, 3, 1, 255, 5, 0.2639,
         7.0052, 0, 0, 24, 108, 0, 0, 254, 18, 0.2666,
         4.8083, 2, 1, 1, 151, 3, 1, 254, 1, 0.6826]
LATENT = [143.0374, 133, 118, 113, 169, 130, 100, 157, 152, -0.1948]
CAPTION = ["a small green square in the center and a small white triangle at the bottom left",
           "a large red circle at the top right of the image",
           "a small green square in the center and a small white triangle at the bottom left",
           "a large red circle at the top right"]


def close(got, want, score_tol=2e-3, pixel_tol=2):
    """Scores and means within ``score_tol`` (relative for the gradient norm); pixel values within
    ``pixel_tol`` of 255 (float summation order may differ across BLAS builds, not more)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(b, int):
            assert abs(a - b) <= pixel_tol, (got, want)
        else:
            assert abs(a - b) <= score_tol * max(1.0, abs(b)), (got, want)


def test_scorer_slice():
    close(g.scorer_slice(), SCORER)


def test_pixel_guidance_slice():
    close(g.pixel_slice(), PIXEL)


def test_latent_guidance_slice(tmp_path, tiny_openclip_dir):
    sd = save_sd_pipeline(make_sd_components(tmp_path / "tok"), tmp_path / "sd")
    close(g.latent_slice(sd, tiny_openclip_dir), LATENT)


def test_caption_slice():
    assert g.caption_slice() == CAPTION
