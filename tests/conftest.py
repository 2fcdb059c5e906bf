import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _clipkit_logs_reach_caplog():
    """An in-process CLI run (CliRunner) configures logging for a terminal: clipkit's logger stops
    propagating and the root logger goes quiet. Undo that before each test so ``caplog`` sees
    library warnings whatever ran before."""
    import logging
    lg = logging.getLogger("clipkit")
    lg.handlers[:] = []
    lg.propagate = True
    lg.setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.WARNING)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared, busy CPU two OpenMP threads stall
    tiny convolutions 5-100x; results do not depend on it. Use with ``pytestmark =
    pytest.mark.usefixtures("one_thread")`` or an autouse fixture that requests it."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_openclip_dir(tmp_path_factory):
    from helpers import make_openclip_dir
    return make_openclip_dir(tmp_path_factory.mktemp("tiny_openclip"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    from helpers import make_hf_clip_dir
    return make_hf_clip_dir(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def shapes_scorer():
    from clipkit.core.scorer import load_scorer
    return load_scorer("shapes", device="cpu")


@pytest.fixture(scope="session", params=["openclip", "hf"])
def tiny_scorer(request, tiny_openclip_dir, tiny_hf_dir):
    from clipkit.core.scorer import load_scorer
    path = tiny_openclip_dir if request.param == "openclip" else tiny_hf_dir
    return load_scorer(str(path), device="cpu")


@pytest.fixture()
def photos():
    """Real photographs shipped inside scikit-image's wheel (never downloaded)."""
    from PIL import Image
    from skimage import data
    return {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")}
