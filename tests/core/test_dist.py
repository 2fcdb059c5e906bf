"""core.dist: accelerate is asked for the CPU only when there is no accelerator; one process alone."""
import torch

from clipkit.core import dist


def test_cpu_only_exactly_when_no_cuda_or_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dist._cpu_only()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not dist._cpu_only()


def test_partial_state_outside_a_launcher_is_one_main_process():
    state = dist.partial_state()
    assert state.num_processes == 1 and state.process_index == 0 and state.is_main_process
    with state.split_between_processes(list(range(5))) as mine:
        assert mine == [0, 1, 2, 3, 4]


def test_one_process_gathers_nothing():
    """Without a process group, gather_cat is the tensor itself: clip_loss in one process is unchanged."""
    t = torch.randn(3, 4, requires_grad=True)
    assert dist.world_size() == 1
    assert dist.gather_cat(t) is t and dist.gather_cat(t, grad=False) is t
