"""search.segments: the index folder's pieces (the fp16 segment writer)."""
import numpy as np

from clipkit.search.segments import NpyAppender


def test_npy_appender_is_a_plain_npy(tmp_path):
    w = NpyAppender(tmp_path / "a.npy", np.float16, 3)
    w.append(np.ones((2, 3)))
    w.append(np.zeros((5, 3)))
    assert w.close() == 7
    a = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert a.shape == (7, 3) and a.dtype == np.float16 and a[:2].sum() == 6 and a[2:].sum() == 0
