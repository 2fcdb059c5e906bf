"""clip_loss over several processes (2 CPU processes, gloo): each process contrasts its pairs against all
processes' pairs, and the gradients averaged over the processes (as DDP / accelerate do) are those of one
process on the concatenated batch; with and without classes (UniCL), equal and unequal local batches."""
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from clipkit.core.train_clip import clip_loss

#: local batch sizes of the two processes: equal, and unequal (a batch that lost unreadable images)
SPLITS = ((4, 4), (3, 5))
CLASSES = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])    # same-class pairs across the two processes' halves


def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"img": torch.nn.Linear(6, 4), "txt": torch.nn.Linear(5, 4)}), \
        torch.nn.Parameter(torch.tensor(2.0))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _step(rows: slice, classes: bool) -> dict:
    """Loss, accuracies and parameter gradients of the tiny two-tower model on ``rows`` of the data."""
    model, scale = _model()
    xi, xt = _data()
    img = F.normalize(model["img"](xi[rows]), dim=-1)
    txt = F.normalize(model["txt"](xt[rows]), dim=-1)
    loss, a_i, a_t = clip_loss(img, txt, scale, CLASSES[rows] if classes else None)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["logit_scale"] = scale.grad
    return {"loss": loss.detach(), "acc_i2t": a_i, "acc_t2i": a_t, "grads": grads}


def _worker(rank: int, world: int, port: int, out: str):
    from datetime import timedelta

    import torch.distributed as td

    from clipkit.core.dist import gather_cat, world_size
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {"world_size": world_size()}
        for split in SPLITS:
            lo = sum(split[:rank])
            rows = slice(lo, lo + split[rank])
            results[split, "gathered"] = gather_cat(torch.arange(lo, lo + split[rank]), grad=False)
            for classes in (False, True):
                r = _step(rows, classes)
                for g in r["grads"].values():             # what DDP does: all-reduce, mean
                    td.all_reduce(g)
                    g /= world
                results[split, classes] = r
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        td.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 120 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("classes", [False, True], ids=["clip", "classes"])
@pytest.mark.parametrize("split", SPLITS, ids=["4+4", "3+5"])
def test_two_processes_give_the_loss_and_gradients_of_the_concatenated_batch(two_process_results, split, classes):
    ref = _step(slice(0, 8), classes)                      # one process, the concatenated batch
    for rank, res in enumerate(two_process_results):
        assert res["world_size"] == 2
        assert torch.equal(res[split, "gathered"], torch.arange(8))    # process order, unequal sizes too
        r = res[split, classes]
        assert torch.allclose(r["loss"], ref["loss"], atol=1e-5), (rank, r["loss"], ref["loss"])
        assert torch.allclose(r["acc_i2t"], ref["acc_i2t"]) and torch.allclose(r["acc_t2i"], ref["acc_t2i"])
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-5), (rank, name)
    # the local batch alone gives another loss: the processes did contrast against each other's pairs
    lo = _step(slice(0, split[0]), classes)
    assert not torch.allclose(lo["loss"], ref["loss"], atol=1e-3)
