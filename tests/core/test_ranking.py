"""core.ranking: exact cosines, the one order (score desc rounded to 1e-6, ties by key), exact top-K."""
import numpy as np
import torch

from clipkit.core.ranking import RankedItem, RankingResult, cosines, order


def test_ties_keep_the_key_order_whatever_the_input_order():
    scores = torch.tensor([0.5, 0.7, 0.5, 0.7, 0.5000001, 0.1])        # 0.5000001 ties 0.5 after rounding
    names = ["e", "b", "a", "c", "d", "f"]
    got = order(names, scores, None)
    assert [names[i] for i, _ in got] == ["b", "c", "a", "d", "e", "f"]
    assert [r for _, r in got] == [1, 2, 3, 4, 5, 6]
    perm = [5, 3, 1, 0, 4, 2]                                           # shuffled input: the same ranking
    again = order([names[i] for i in perm], scores[perm], None)
    assert [names[perm[i]] for i, _ in again] == [names[i] for i, _ in got]


def test_keys_may_be_any_comparable_type():
    scores = torch.tensor([0.2, 0.9, 0.9, 0.2])
    assert order([12, 11, 10, 3], scores, None) == [(2, 1), (1, 2), (3, 3), (0, 4)]   # ints by value


def test_top_k_is_the_prefix_of_the_full_order_also_across_a_tie():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(300, generator=g)
    scores[:60] = scores[60:120]                                        # many exact ties
    scores[torch.topk(scores, 7).indices] = scores.max()               # a tie across the K boundary
    names = [f"n{i:03d}" for i in torch.randperm(300, generator=g).tolist()]
    full = order(names, scores, None)
    brute = sorted(range(300), key=lambda i: (-round(float(scores[i]), 6), names[i]))
    assert [i for i, _ in full] == brute
    for k in (1, 3, 7, 8, 299, 300, 1000):
        assert order(names, scores, k) == full[:k]
    assert order([], torch.zeros(0), 5) == []


def test_cosines_are_exact_and_do_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    whole = cosines(emb, q)
    assert whole.shape == (50, 3) and whole.dtype == torch.float32
    ref = emb.double().numpy() @ q.double().numpy().T
    assert np.allclose(whole.numpy(), ref, atol=1e-7)
    chunked = torch.cat([cosines(emb[a:a + 7], q) for a in range(0, 50, 7)])
    assert torch.equal(chunked, whole)


def test_result_reports(tmp_path):
    res = RankingResult(["q"], "m", [RankedItem(1, 0.5, path="a.png"), RankedItem(2, 0.25, path="b.png")])
    d = res.to_dict()
    assert d["results"] == [{"rank": 1, "score": 0.5, "path": "a.png"}, {"rank": 2, "score": 0.25, "path": "b.png"}]
    assert d["score"] == "cosine" and d["skipped"] == []
    out = res.write_csv(tmp_path / "r.csv")
    assert out.read_text().splitlines() == ["rank,score,path", "1,0.500000,a.png", "2,0.250000,b.png"]


def test_order_top_k_is_exact_and_touches_only_k_names():
    g = torch.Generator().manual_seed(0)
    n = 5000
    scores = torch.rand(n, generator=g) * 2 - 1
    scores[:400] = scores[400:800]                          # exact ties
    scores[800:1200] = scores[1200:1600] + 3e-7             # ties after rounding to 1e-6
    scores[torch.topk(scores, 10).indices] = scores.max()   # a tie across the top-K boundary
    names = [f"f{int(i):05d}" for i in torch.randperm(n, generator=g)]
    brute = sorted(range(n), key=lambda i: (-round(float(scores[i]), 6), names[i]))

    class Counting(list):
        reads = 0

        def __getitem__(self, i):
            Counting.reads += 1
            return list.__getitem__(self, i)
    for k in (1, 5, 37, n, None):
        Counting.reads = 0
        got = order(Counting(names), scores, k)
        assert [i for i, _ in got] == brute[:k] and [r for _, r in got] == list(range(1, len(got) + 1))
        if k == 5:
            assert Counting.reads <= 40, Counting.reads       # O(K + ties), not O(N)
