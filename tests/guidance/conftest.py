import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # every guidance test runs on one thread: two OpenMP threads on a shared, busy CPU stall tiny
    # convolutions by ~100x; results do not depend on it
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
