"""Reliability of the search index (issue 27): its files are checked against each other, only regular
files are read, a damaged file is one line naming it, the CLIP is the one it was built with (from any
working directory, with the same weights), an output never replaces an indexed image, and a contact
sheet says which results are missing.

Each check runs the real CLI (in-process through click's CliRunner, as ``faults.py`` does in the
suite; ``CLIPKIT_FAULTS_MODE=subprocess`` runs them as processes) and holds it to the contract: bad
input -> one line ``Error: ...`` naming the file, exit 2, no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import faults
from faults import make_images, snapshot

pytestmark = pytest.mark.slow
QUERY = ["-q", "a red shape", "--top", "3", "--json"]


@pytest.fixture(autouse=True)
def _inprocess(monkeypatch):
    monkeypatch.setattr(faults, "MODE", os.environ.get("CLIPKIT_FAULTS_MODE", "inprocess"))


def cli(args, tmp, **kw):
    return faults.clipkit(["-q", *map(str, args)], tmp / "xdg", **kw)


def assert_error_naming(r, name: str):
    """Exit 2, one line ``Error: ...`` naming ``name``, no traceback, no hang."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert not r.hung, "hung"
    assert r.rc == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.err, \
        f"rc={r.rc} {r.err[-600:]}"
    assert name in lines[0], lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_scorer):
    """Two image indexes (A: a folder + a list naming images elsewhere; B: another folder) and an IVF
    index of vectors recorded as the Shapes CLIP's, built once; tests work on copies."""
    from clipkit.search import AnnConfig, VectorSource, build_index
    root = tmp_path_factory.mktemp("index_faults")
    make_images(root / "a", 5, seed=0)
    others = make_images(root / "others", 2, seed=2)
    (root / "list.txt").write_text("".join(f"{p}\n" for p in others))
    make_images(root / "b", 4, seed=1)
    build_index([root / "a", root / "list.txt"], root / "A.idx", shapes_scorer, batch_size=8)
    build_index([root / "b"], root / "B.idx", shapes_scorer, batch_size=8)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, 128))
    x = centres[rng.integers(0, 16, 3000)] + 0.5 * rng.standard_normal((3000, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_index(None, root / "V.idx", vectors=VectorSource(x.astype(np.float32)), model="shapes",
                preprocess=shapes_scorer.preprocess.to_dict(), config=AnnConfig(flat_max=100))
    return root


def copy(world: Path, name: str, tmp: Path) -> Path:
    shutil.copytree(world / name, tmp / name, symlinks=True)
    return tmp / name


def codes_file(idx: Path) -> Path:
    """The segment's codes (format 2: list numbers, ``lists-*``; format 1: ``codes-*``)."""
    return next(p for p in sorted(idx.iterdir()) if p.name.endswith("-g1.npy"))


def edit_manifest(idx: Path, **changes) -> None:
    m = json.loads((idx / "manifest.json").read_text())
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            m[a][b] = v
        else:
            m[k] = v
    (idx / "manifest.json").write_text(json.dumps(m))


# ---- 1. the files of an index are checked against each other ---------------------------------------

def test_files_of_another_index_are_refused(world, tmp_path):
    a = copy(world, "A.idx", tmp_path)
    ok = cli(["search", a, *QUERY], tmp_path)
    assert ok.rc == 0, ok.err
    shutil.copy(world / "B.idx" / "meta.sqlite", a / "meta.sqlite")      # B's metadata: B's paths
    r = cli(["search", a, *QUERY], tmp_path)
    assert_error_naming(r, "meta.sqlite")
    assert str(world / "b") not in r.out
    a2 = copy(world, "A.idx", tmp_path / "2")
    shutil.copy(world / "B.idx" / "manifest.json", a2 / "manifest.json")  # B's manifest
    assert_error_naming(cli(["index", "info", a2], tmp_path), "meta.sqlite")


@pytest.mark.parametrize("field, value", [("ann.nprobe", -5), ("ann.nprobe", 10 ** 6), ("dim", "128"),
                                          ("segments", [{"emb": "../../etc/passwd", "codes": "x", "start": 0,
                                                         "rows": 7}]), ("config.target_recall", 7)])
def test_manifest_fields_are_validated(world, tmp_path, field, value):
    a = copy(world, "A.idx", tmp_path)
    edit_manifest(a, **{field: value})
    assert_error_naming(cli(["index", "info", a], tmp_path), "manifest.json")


def test_garbage_embeddings_are_refused_not_scored(world, tmp_path):
    a = copy(world, "A.idx", tmp_path)
    emb = a / "emb-000001.npy"
    data = bytearray(emb.read_bytes())
    body = np.random.default_rng(0).integers(0, 256, len(data) - 128, dtype=np.uint8).tobytes()
    emb.write_bytes(bytes(data[:128]) + body)                             # header intact, body garbage
    assert_error_naming(cli(["search", a, *QUERY], tmp_path), "emb-000001.npy")


def test_verify_reads_every_file_against_its_digest(world, tmp_path):
    a = copy(world, "A.idx", tmp_path)
    ok = cli(["index", "info", a, "--verify", "--json"], tmp_path)
    assert ok.rc == 0 and json.loads(ok.out)["verified"]["ok"], ok.err
    emb = a / "emb-000001.npy"
    data = bytearray(emb.read_bytes())
    data[128 + 2 * 37] ^= 0x01                     # the lowest mantissa bit of one value: still a unit vector
    emb.write_bytes(bytes(data))
    assert cli(["index", "info", a], tmp_path).rc == 0                    # the cheap checks cannot see it
    assert_error_naming(cli(["index", "info", a, "--verify"], tmp_path), "emb-000001.npy")


# ---- 2. a FIFO (any non-regular file) as an index file never hangs ------------------------------------

@pytest.mark.parametrize("which", ["emb", "codes", "ivf", "meta", "manifest"])
def test_fifo_as_an_index_file_is_refused(world, tmp_path, which):
    a = copy(world, "A.idx", tmp_path)
    target = {"emb": a / "emb-000001.npy", "codes": codes_file(a), "ivf": next(a.glob("ivf-*.faiss")),
              "meta": a / "meta.sqlite", "manifest": a / "manifest.json"}[which]
    target.unlink()
    os.mkfifo(target)
    # SQLite retries an interrupted open() itself: a hang there is bounded only in a subprocess
    mode = "subprocess" if which == "meta" else None
    for args in (["index", "info", a], ["search", a, *QUERY]):
        r = cli(args, tmp_path, timeout=30, mode=mode)
        assert_error_naming(r, target.name)
        assert "not a regular file" in r.err
        if mode:
            break


# ---- 3. damaged files are one line naming the file (exit 2), not "unexpected failure" ----------------

def _truncate(p: Path, n: int = 100):
    p.write_bytes(p.read_bytes()[:-n])


def _garbage(p: Path, keep_header: bool = False):
    data = p.read_bytes()
    head = data[:128] if keep_header else b""
    p.write_bytes(head + bytes([0xA7, 0x3C, 0xFF, 0x12]) * max(1, (len(data) - len(head)) // 4))


CORRUPT = {
    "emb truncated": ("A.idx", lambda i: _truncate(i / "emb-000001.npy"), "emb-000001.npy"),
    "emb garbage": ("A.idx", lambda i: _garbage(i / "emb-000001.npy"), "emb-000001.npy"),
    "codes truncated": ("V.idx", lambda i: _truncate(codes_file(i)), "-000001-g1.npy"),
    "codes garbage": ("V.idx", lambda i: _garbage(codes_file(i)), "-000001-g1.npy"),
    "codes garbage body": ("V.idx", lambda i: _garbage(codes_file(i), keep_header=True), "-000001-g1.npy"),
    "ivf garbage": ("V.idx", lambda i: _garbage(i / "ivf-g1.faiss"), "ivf-g1.faiss"),
    "ivf truncated": ("V.idx", lambda i: _truncate(i / "ivf-g1.faiss", 3000), "ivf-g1.faiss"),
    "meta garbage": ("A.idx", lambda i: _garbage(i / "meta.sqlite"), "meta.sqlite"),
    "manifest model null": ("A.idx", lambda i: edit_manifest(i, model=None), "manifest.json"),
    "manifest rows 1e12": ("A.idx", lambda i: edit_manifest(i, rows=10 ** 12), "manifest.json"),
    "manifest rows float": ("A.idx", lambda i: edit_manifest(i, rows=1e12), "manifest.json"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_damaged_index_file_is_a_one_line_error(world, tmp_path, case):
    name, damage, names = CORRUPT[case]
    idx = copy(world, name, tmp_path)
    damage(idx)
    assert_error_naming(cli(["search", idx, *QUERY], tmp_path), names)


def test_add_after_the_model_changed_width_is_refused(tmp_path):
    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    from helpers import TINY_OPENCLIP_CFG, TINY_PREPROCESS, make_openclip_dir
    make_images(tmp_path / "imgs", 3)
    make_images(tmp_path / "more", 2, seed=3)
    model = make_openclip_dir(tmp_path / "model")
    r = cli(["index", "build", tmp_path / "imgs", "--out", tmp_path / "i.idx", "--clip", model, "--workers", "0"],
            tmp_path)
    assert r.rc == 0, r.err
    shutil.rmtree(model)
    cfg = json.loads(json.dumps(TINY_OPENCLIP_CFG))
    cfg["embed_dim"] = 16
    save_openclip_dir(build_openclip(cfg), cfg, TINY_PREPROCESS, model)
    for args in (["index", "add", tmp_path / "i.idx", tmp_path / "more", "--workers", "0"],
                 ["index", "add", tmp_path / "i.idx", tmp_path / "more", "--workers", "0", "--clip", model],
                 ["search", tmp_path / "i.idx", *QUERY]):
        r = cli(args, tmp_path)
        assert_error_naming(r, str(model))
        assert "weights" in r.err


def _hot_journal(meta: Path) -> None:
    """A writer killed mid-transaction: its rollback journal is left 'hot' beside meta.sqlite."""
    code = ("import os, signal, sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('PRAGMA cache_size=1')\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "db.executemany(\"INSERT INTO skipped VALUES (?, 'x', 99)\", [(str(i) * 20,) for i in range(20000)])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(meta)], check=False)
    assert Path(str(meta) + "-journal").is_file()


def test_hot_journal_is_rolled_back_by_a_reader(world, tmp_path):
    a = copy(world, "A.idx", tmp_path)
    want = cli(["search", a, *QUERY], tmp_path)
    _hot_journal(a / "meta.sqlite")
    r = cli(["search", a, *QUERY], tmp_path)
    assert r.rc == 0, r.err
    assert json.loads(r.out)["results"] == json.loads(want.out)["results"]
    assert not Path(str(a / "meta.sqlite") + "-journal").exists()


def test_hot_journal_on_a_read_only_index_says_what_to_run(world, tmp_path, monkeypatch):
    a = copy(world, "A.idx", tmp_path)
    _hot_journal(a / "meta.sqlite")
    os.chmod(a, 0o555)
    if os.geteuid() == 0:                                  # root writes anyway: say the folder is read-only
        from clipkit.search import meta
        monkeypatch.setattr(meta, "_can_write", lambda *a: False, raising=False)
        monkeypatch.setattr(faults, "MODE", "inprocess")
    try:
        r = cli(["search", a, *QUERY], tmp_path)
    finally:
        os.chmod(a, 0o755)
    assert_error_naming(r, "meta.sqlite")
    assert "clipkit index info" in r.err


# ---- 4. the CLIP is recorded as a resolved path plus its weights digest ---------------------------------

def test_relative_clip_is_resolved_and_its_weights_checked(tmp_path, monkeypatch):
    from helpers import make_openclip_dir
    x, y = tmp_path / "x", tmp_path / "y"
    make_images(x / "imgs", 3)
    make_openclip_dir(x / "RW" / "model", seed=0)
    make_openclip_dir(y / "RW" / "model", seed=1)                         # another model, same relative path
    monkeypatch.chdir(x)
    r = cli(["index", "build", "imgs", "--out", "i.idx", "--clip", "RW/model", "--workers", "0"], tmp_path)
    assert r.rc == 0, r.err
    want = cli(["search", "i.idx", *QUERY], tmp_path)
    assert want.rc == 0, want.err
    monkeypatch.chdir(y)
    idx = x / "i.idx"
    got = cli(["search", idx, *QUERY], tmp_path)                            # the index's model, not y's RW/model
    assert got.rc == 0, got.err
    assert json.loads(got.out)["results"] == json.loads(want.out)["results"]
    assert json.loads(got.out)["model"] == str(x / "RW" / "model")
    same = cli(["search", idx, *QUERY, "--clip", x / "RW" / "model"], tmp_path)   # the absolute path
    assert same.rc == 0, same.err
    assert_error_naming(cli(["search", idx, *QUERY, "--clip", "RW/model"], tmp_path), "not comparable")
    shutil.rmtree(x / "RW" / "model")                                       # replaced in place: other weights
    make_openclip_dir(x / "RW" / "model", seed=1)
    r = cli(["search", idx, *QUERY], tmp_path)
    assert_error_naming(r, "weights")


# ---- 5. an output that is one of the inputs (an indexed image) is refused, --overwrite or not -----------

def test_outputs_never_replace_indexed_images(world, tmp_path):
    a = copy(world, "A.idx", tmp_path)
    in_folder, listed = world / "a" / "0001.png", world / "others" / "0000.png"
    before = snapshot(world, skip=(world / "A.idx", world / "B.idx", world / "V.idx"))
    for args in (["search", a, *QUERY, "--sheet", in_folder, "--overwrite"],
                 ["search", a, *QUERY, "--sheet", listed, "--overwrite"],
                 ["search", a, *QUERY, "--csv", listed, "--overwrite"],
                 ["index", "dedup", a, "--csv", listed, "--overwrite"],
                 ["index", "dedup", a, "--csv", in_folder, "--overwrite"]):
        r = cli(args, tmp_path)
        assert_error_naming(r, "is one of the inputs")
    assert snapshot(world, skip=(world / "A.idx", world / "B.idx", world / "V.idx")) == before


# ---- 6. a contact sheet labels the results whose file is gone ------------------------------------------

def test_sheet_labels_missing_files(tmp_path, shapes_scorer):
    from PIL import Image

    from clipkit.search import build_index
    paths = make_images(tmp_path / "imgs", 3)
    build_index([tmp_path / "imgs"], tmp_path / "s.idx", shapes_scorer, batch_size=8)
    gone = paths[1]
    gone.unlink()
    r = cli(["search", tmp_path / "s.idx", *QUERY, "--sheet", tmp_path / "sheet.png"], tmp_path)
    assert r.rc == 0, r.err
    ranks = {h["path"]: h["rank"] for h in json.loads(r.out)["results"]}
    n = ranks[str(gone)] - 1
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L")).astype(int)
    thumb, label_h, cols = 128, 16, 5
    x, y = 8 + (n % cols) * (thumb + 8), 8 + (n // cols) * (thumb + label_h + 8)
    tile = sheet[y + 8:y + thumb - 8, x + 8:x + thumb - 8]                  # inside the tile's frame
    label = sheet[y + thumb + 2:y + thumb + label_h, x:x + thumb]
    assert (label > 150).sum() > 20, "no label under the tile of a missing file"
    assert (tile > 150).sum() > 10, "the tile of a missing file says nothing"
    # the label is wider than a present file's ("#2  0.123  missing" vs "#2  0.123")
    present = next(ranks[p] for p in ranks if p != str(gone)) - 1
    px = 8 + (present % cols) * (thumb + 8)
    other = sheet[y + thumb + 2:y + thumb + label_h, px:px + thumb]
    assert np.nonzero((label > 150).any(axis=0))[0].max() > np.nonzero((other > 150).any(axis=0))[0].max() + 20
