"""search.dedup: near-duplicate groups of the shared index, their CSV and contact sheets."""
import csv
import os

import pytest

from clipkit.core.errors import InputError
from clipkit.search import IndexReader, dedup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dedup_groups(built, corpus, tmp_path):
    out, _ = built
    _, folder, _, _ = corpus
    r = IndexReader(out)
    res = dedup(r, 0.999)
    groups = [[os.path.basename(it.path) for it in g.items] for g in res.groups]
    assert ["dup_a.png", "dup_b.png", "img00.png"] in [sorted(g) for g in groups]
    g = next(g for g in res.groups if any("dup_a" in it.path for it in g.items))
    assert g.items[0].score == pytest.approx(1, abs=1e-6) and all(it.score >= 0.999 for it in g.items)
    res.write_csv(tmp_path / "d.csv")
    rows = list(csv.reader(open(tmp_path / "d.csv")))
    assert rows[0] == ["group", "id", "score", "path"] and len(rows) == 1 + sum(len(g.items) for g in res.groups)
    sheets = res.contact_sheets(tmp_path / "sheets", r.item_image)
    assert sheets and all(p.is_file() for p in sheets)
    with pytest.raises(InputError):
        dedup(r, 1.5)
