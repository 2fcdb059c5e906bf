"""core.errors: the typed errors the CLI turns into exit code 2, and the messages they carry."""
import pytest

from clipkit.core.errors import ClipkitError, ImageLoadError, InputError, ModelLoadError


def test_input_error_is_a_clipkit_error_and_a_value_error():
    assert issubclass(InputError, ClipkitError) and issubclass(InputError, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise InputError("bad")


def test_model_load_error_names_the_spec_reason_and_fix():
    e = ModelLoadError("hf:nobody/x", "not found", "check the name")
    assert isinstance(e, ClipkitError) and not isinstance(e, ValueError)
    assert str(e) == "cannot load model 'hf:nobody/x': not found (check the name)"
    assert (e.spec, e.reason, e.fix) == ("hf:nobody/x", "not found", "check the name")
    assert str(ModelLoadError("shapes", "broken")) == "cannot load model 'shapes': broken"


def test_image_load_error_keeps_path_reason_and_permanence(tmp_path):
    e = ImageLoadError(tmp_path / "a.png", "empty file")
    assert e.path == str(tmp_path / "a.png") and e.reason == "empty file" and e.permanent
    assert str(e) == f"cannot read image {tmp_path / 'a.png'}: empty file"
    assert not ImageLoadError("b.png", "decoding took longer than 1s", permanent=False).permanent
