"""search.sources: SOURCE arguments -> image files with captions (folders, sidecars, file lists) and
webdataset shards ({000..001} ranges; samples, captions, samples without an image)."""
import pytest
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.search.sources import expand_sources, iter_shard, pil_bytes, sidecar_caption, write_shard


def test_folder_sidecars_lists_and_duplicates(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.new("RGB", (8, 8)).save(d / name)
    (d / "a.txt").write_text("  a  red\n circle ")
    (d / "b.caption").write_text("")
    (d / "notes.md").write_text("not an image")
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/b.jpg\tfrom the list\nimgs/a.png\n")
    assert sidecar_caption(d / "a.png") == "a red circle" and sidecar_caption(d / "b.jpg") is None
    src = expand_sources([d, lst, d])                               # each file once
    paths = [f.path for f in src.files]
    assert sorted(paths) == sorted(str(d / n) for n in ("a.png", "b.jpg", "sub/c.png")) and len(set(paths)) == 3
    caps = {f.path: f.caption for f in src.files}
    assert caps[str(d / "a.png")] == "a red circle"
    with pytest.raises(InputError, match="no sources"):
        expand_sources([])


def test_shard_samples_and_captions(tmp_path):
    im = Image.new("RGB", (8, 8), (255, 0, 0))
    shard = write_shard(tmp_path / "s-000.tar", {"k1": {"png": pil_bytes(im), "txt": b"red square"},
                                             "k2": {"txt": b"no image here"}})
    write_shard(tmp_path / "s-001.tar", {"k3": {"png": pil_bytes(im)}})
    assert expand_sources(shard).shards == [str(shard)]
    assert expand_sources(str(tmp_path / "s-{000..001}.tar")).shards == [str(shard), str(tmp_path / "s-001.tar")]
    samples = list(iter_shard(str(shard)))
    good = [s for s in samples if s.data is not None]
    assert len(good) == 1 and good[0].caption == "red square" and good[0].path == f"{shard}#k1.png"
    assert any(s.data is None and "no image" in (s.reason or "") for s in samples)
