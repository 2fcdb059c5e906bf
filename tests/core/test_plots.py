"""core.plots: figures are written as PNGs, never over an existing file unless asked."""
import numpy as np
import pytest
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.core.plots import confusion_matrix_plot, similarity_heatmap


def test_similarity_heatmap_writes_a_png_and_refuses_to_overwrite(tmp_path):
    ims = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    sim = np.array([[0.3, 0.1, -0.05], [0.0, 0.25, 0.2]])
    texts = ["a red thing", "a blue thing", "a very long text that is cut short in the column label"]
    out = similarity_heatmap(ims, texts, sim, tmp_path / "h.png")
    assert out == tmp_path / "h.png" and Image.open(out).format == "PNG"
    before = out.read_bytes()
    with pytest.raises(InputError):
        similarity_heatmap(ims, texts, sim, out)
    assert out.read_bytes() == before
    similarity_heatmap(ims, texts, sim * 0, out, overwrite=True)
    assert out.read_bytes() != before


def test_confusion_matrix_plot_with_an_empty_row(tmp_path):
    out = confusion_matrix_plot([[3, 1, 0], [0, 0, 0], [1, 0, 5]], ["a", "b", "c"], tmp_path / "c.png", title="t")
    w, h = Image.open(out).size
    assert w > 100 and h > 100 and not list(tmp_path.glob(".*"))      # no temporary file left behind
