import logging

import pytest
from helpers import make_colour_folder

from clipkit.core.errors import InputError
from clipkit.core.labelled import load_labelled, read_class_names


def test_split_layout_classes_and_default_eval_split(tmp_path):
    ds = load_labelled(make_colour_folder(tmp_path / "d"))
    assert ds.classes == ["blue", "green", "red"] and ds.names == ds.classes
    assert set(ds.splits) == {"train", "val", "test"} and ds.has_splits
    assert ds.eval_split().name == "test" and len(ds.eval_split()) == 9
    assert len(ds.split("all")) == 27 and ds.split("validation").name == "val"
    assert ds.split("train").counts(3) == [4, 4, 4]


def test_flat_layout_and_fallbacks(tmp_path, caplog):
    root = make_colour_folder(tmp_path / "d", {"": 2})
    (root / "loose.png").write_bytes((root / "red" / "0.png").read_bytes())
    with caplog.at_level(logging.WARNING):
        ds = load_labelled(root)
    assert not ds.has_splits and ds.eval_split().name == "all" and len(ds.eval_split()) == 6
    assert "outside the class folders" in caplog.text
    only_val = make_colour_folder(tmp_path / "v", {"train": 1, "val": 1})
    assert load_labelled(only_val).eval_split().name == "val"


def test_bad_layouts_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        load_labelled(tmp_path / "missing")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="1 class .*at least 2"):
        load_labelled(tmp_path / "one")
    mixed = make_colour_folder(tmp_path / "mixed", {"train": 1})
    (mixed / "extra").mkdir()
    with pytest.raises(InputError, match="mixes split folders"):
        load_labelled(mixed)
    with pytest.raises(InputError, match="no 'val' split"):
        load_labelled(make_colour_folder(tmp_path / "t", {"train": 1, "test": 1})).split("val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        load_labelled(tmp_path / "empty")


def test_empty_class_folder_warns_and_stays_a_label(tmp_path, caplog):
    root = make_colour_folder(tmp_path / "d", {"train": 1, "test": 1})
    (root / "test" / "yellow").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = load_labelled(root)
    assert "yellow" in ds.classes and "without images" in caplog.text


def test_class_names_json_and_lines(tmp_path, caplog):
    classes = ["0", "1", "2"]
    (tmp_path / "n.json").write_text('{"0": "zero", "1": "one", "7": "seven"}')
    with caplog.at_level(logging.WARNING):
        assert read_class_names(tmp_path / "n.json", classes) == ["zero", "one", "2"]
    assert "no name for 1 classes" in caplog.text and "not in the data" in caplog.text
    (tmp_path / "n.txt").write_text("# folder,name\n0,the digit 0\n1, one, uno\n2,two\n")
    assert read_class_names(tmp_path / "n.txt", classes) == ["the digit 0", "one, uno", "two"]
    (tmp_path / "dup.txt").write_text("0,same\n1,Same\n")
    with pytest.raises(InputError, match="same name"):
        read_class_names(tmp_path / "dup.txt", classes)
    (tmp_path / "bad.txt").write_text("0\n")
    with pytest.raises(InputError, match="line 1"):
        read_class_names(tmp_path / "bad.txt", classes)


def test_csv_and_jsonl_lists(tmp_path, caplog):
    root = make_colour_folder(tmp_path / "d", {"": 2})
    (tmp_path / "d" / "list.csv").write_text("path,label,split\nred/0.png,red,train\nred/1.png,red,test\n"
                                             "blue/0.png,blue,train\nblue/1.png,blue,test\nbroken\n")
    with caplog.at_level(logging.WARNING):
        ds = load_labelled(root / "list.csv")
    assert ds.classes == ["blue", "red"] and set(ds.splits) == {"train", "test"}
    assert ds.splits["test"].paths[0] == str(root / "blue" / "1.png") and "1 malformed" in caplog.text
    (tmp_path / "l.jsonl").write_text('{"path": "d/red/0.png", "label": "red"}\n'
                                      '{"image": "d/green/0.png", "label": "green"}\n')
    assert load_labelled(tmp_path / "l.jsonl").eval_split().name == "all"
    (tmp_path / "s.csv").write_text("d/red/0.png,red,holdout\nd/green/0.png,green,train\n")
    with pytest.raises(InputError, match="split 'holdout'"):
        load_labelled(tmp_path / "s.csv")
