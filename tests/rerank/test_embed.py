"""rerank.embed: ``embed_folder_distributed`` in one process (the two-process run under `accelerate
launch` is tests/cli/test_embed.py): one safetensors file in file order, skipped files, the cache,
no shard left behind, no overwrite."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipkit.core.errors import InputError
from clipkit.rerank.embed import embed_folder_distributed


@pytest.fixture()
def small_folder(tmp_path):
    from helpers import make_images
    d = tmp_path / "imgs"
    paths = make_images(d, 2, 2)
    (d / "broken.png").write_bytes(b"nope")
    return d, paths


def test_one_process_writes_one_file(small_folder, shapes_scorer, tmp_path):
    d, paths = small_folder
    out = tmp_path / "e.safetensors"
    res = embed_folder_distributed([d], out, shapes_scorer, batch_size=2, cache_dir=tmp_path / "cache")
    assert res["count"] == 4 and res["cached"] == 0 and [s["path"] for s in res["skipped"]] == [str(d / "broken.png")]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert sorted(json.loads(meta["paths"])) == sorted(str(p) for p in paths)
    assert meta["model"] == "shapes" and meta["processes"] == "1"
    emb = load_file(str(out))["embeddings"]
    assert emb.shape == (4, 128) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []          # shards removed
    with pytest.raises(InputError, match="refusing to overwrite"):
        embed_folder_distributed([d], out, shapes_scorer)
    again = embed_folder_distributed([d], out, shapes_scorer, overwrite=True, cache_dir=tmp_path / "cache")
    assert again["cached"] == 4 and torch.allclose(load_file(str(out))["embeddings"], emb, atol=1e-6)


def test_no_images_is_an_input_error(tmp_path, shapes_scorer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        embed_folder_distributed([tmp_path / "empty"], tmp_path / "e.safetensors", shapes_scorer)
