"""Caption metrics against values derived by hand and values published for pycocoevalcap."""
import math

import pytest
import torch

from clipkit.captioning.metrics import (HESSEL_PREFIX, CaptionMetrics, cider_d_scores, clip_s, coco_tokenize,
                                        corpus_bleu, evaluate_captions, harmonic_mean, lcs_length, ref_clip_s,
                                        rouge_l)
from clipkit.core.errors import InputError

TINY = 1e-15     # pycocoevalcap's BLEU smoothing constants: (correct + TINY) / (guess + SMALL)
SMALL = 1e-9


def toks(s):
    return s.split()


# ---- tokenisation -------------------------------------------------------------------------------

def test_coco_tokenize_lowercases_and_drops_punctuation():
    assert coco_tokenize('A Red "Circle", (top-left)!') == ["a", "red", "circle", "top-left"]
    assert coco_tokenize("The dog's ears. It isn't; really?") == ["the", "dog", "'s", "ears", "it", "is", "n't",
                                                                   "really"]
    assert coco_tokenize("3.5 cats... 1,000 dogs -- at 10:30 in the U.S.") == [
        "3.5", "cats", "1,000", "dogs", "at", "10:30", "in", "the", "u.s."]
    assert coco_tokenize("the dogs' bowls , cannot") == ["the", "dogs", "bowls", "can", "not"]
    assert coco_tokenize(" . ! ") == []
    with pytest.raises(InputError):
        coco_tokenize(None)


# ---- BLEU ---------------------------------------------------------------------------------------

def test_identical_caption_scores_one():
    cands = {"a": "A large red circle on the left.", "b": "two shapes: a blue square and a green triangle"}
    refs = {k: [v, "something else entirely"] for k, v in cands.items()}
    m = evaluate_captions(cands, refs)
    for v in (m.bleu1, m.bleu2, m.bleu3, m.bleu4, m.rouge_l):
        assert v == pytest.approx(1.0, abs=1e-8)
    assert m.n_images == 2


def test_bleu_by_hand_with_clipping_and_brevity_penalty():
    # candidate "the the cat sat" (4 tokens) vs one reference "the cat sat on the mat" (6 tokens)
    #   1-grams: the x2 (ref has "the" x2 -> 2 match), cat, sat   -> 4/4
    #   2-grams: "the the" (0), "the cat" (1), "cat sat" (1)       -> 2/3
    #   3-grams: "the the cat" (0), "the cat sat" (1)              -> 1/2
    #   4-grams: "the the cat sat" (0)                             -> 0/1 (-> TINY)
    #   brevity penalty: c = 4 < r = 6 -> exp(1 - 6/4) = exp(-0.5)
    b = corpus_bleu([toks("the the cat sat")], [[toks("the cat sat on the mat")]])
    bp = math.exp(-0.5)
    assert b[0] == pytest.approx(1.0 * bp, rel=1e-8)
    assert b[1] == pytest.approx(math.sqrt(2 / 3) * bp, rel=1e-8)
    assert b[2] == pytest.approx((1 * 2 / 3 * 1 / 2) ** (1 / 3) * bp, rel=1e-8)
    assert b[3] == pytest.approx((1 * 2 / 3 * 1 / 2 * TINY) ** (1 / 4) * bp, rel=1e-6)
    assert b[3] < 1e-3
    # clipping: "the the the" vs "the cat": only one "the" counts -> p1 = 1/3; c = 3 > r = 2, no penalty
    assert corpus_bleu([toks("the the the")], [[toks("the cat")]])[0] == pytest.approx(1 / 3, rel=1e-8)
    # clipping uses the max count over references: a second ref with "the the" allows 2
    assert corpus_bleu([toks("the the the")], [[toks("the cat"), toks("the the")]])[0] == pytest.approx(2 / 3)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    # image 1: "a b" vs "a b" (2/2 unigrams); image 2: "c d e f" vs "c x e f" (3/4)
    # corpus p1 = (2 + 3) / (2 + 4) = 5/6; the mean of sentence precisions would be 7/8
    # corpus p2 = (1 + 1) / (1 + 3) = 1/2  ("a b"; "e f" only)
    b = corpus_bleu([toks("a b"), toks("c d e f")], [[toks("a b")], [toks("c x e f")]])
    assert b[0] == pytest.approx(5 / 6, rel=1e-8)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 1 / 2), rel=1e-8)


def test_bleu_closest_reference_length():
    refs3_7 = [toks("x x x"), toks("y y y y y y y")]
    # candidate of 5 tokens: refs of 3 and 7 are equally close -> the shorter (3) -> no penalty
    assert corpus_bleu([toks("x x x z z")], [refs3_7])[0] == pytest.approx(3 / 5, rel=1e-8)
    # candidate of 6 tokens: 7 is closest -> penalty exp(1 - 7/6)
    b = corpus_bleu([toks("x x x z z z")], [refs3_7])[0]
    assert b == pytest.approx(3 / 6 * math.exp(1 - 7 / 6), rel=1e-8)
    # over a corpus the effective lengths add up: c = 2 + 6 = 8, r = 3 + 7 = 10
    b = corpus_bleu([toks("x x"), toks("x x x z z z")], [[toks("x x x")], refs3_7])[0]
    assert b == pytest.approx(5 / 8 * math.exp(1 - 10 / 8), rel=1e-8)


# ---- ROUGE-L ------------------------------------------------------------------------------------

def test_lcs_and_rouge_l_by_hand():
    cand = toks("a red circle at the top")                    # 6 tokens
    ref = toks("a large red circle on the top left")          # 8 tokens
    assert lcs_length(cand, ref) == 5                         # a red circle the top
    assert lcs_length(ref, cand) == 5
    p, r, beta2 = 5 / 6, 5 / 8, 1.2 ** 2
    assert rouge_l(cand, [ref]) == pytest.approx((1 + beta2) * p * r / (r + beta2 * p), rel=1e-12)
    assert rouge_l(cand, [cand]) == 1.0
    assert rouge_l(toks("x y"), [ref]) == 0.0
    assert rouge_l([], [ref]) == 0.0


def test_rouge_l_takes_max_precision_and_max_recall_separately():
    # pycocoevalcap's quirk: "a b" gives P = 2/3, R = 1; "a b c d e f" gives P = 1, R = 1/2;
    # max P = 1 and max R = 1 come from different references -> F = 1
    assert rouge_l(toks("a b c"), [toks("a b"), toks("a b c d e f")]) == pytest.approx(1.0)


def test_rouge_l_is_averaged_over_images():
    cands = {1: "a b c", 2: "x y"}
    refs = {1: ["a b c"], 2: ["q r"]}
    assert evaluate_captions(cands, refs).rouge_l == pytest.approx(0.5)


# ---- CIDEr-D ------------------------------------------------------------------------------------

def test_cider_d_by_hand_two_images():
    # Image A: candidate "red red circle", references "a red circle", "red circle"
    # Image B: candidate "a blue square", reference "a blue square"
    # N = 2 images, L = log 2. Document frequency over the references: "a" occurs in both images'
    # references -> idf = log 2 - log 2 = 0; every other reference n-gram in one image -> idf = L;
    # "red red" occurs nowhere -> idf = L - log(max(1, 0)) = L. tf = raw counts.
    L = math.log(2)
    # A's candidate vectors: 1-gram red 2L, circle L (norm sqrt(5) L); 2-gram "red red" L, "red circle" L
    # (norm sqrt(2) L); 3-gram "red red circle" L (norm L); no 4-gram (norm 0). Length = 2 bigrams.
    # Ref "a red circle": 1-gram a 0, red L, circle L (norm sqrt(2) L); 2-gram "a red" L, "red circle" L
    # (norm sqrt(2) L); 3-gram "a red circle" (norm L); 2 bigrams -> delta 0, penalty 1.
    #   n=1: min(2L, L) L + min(L, L) L = 2L^2 (red clipped to L)  -> 2 / (sqrt(5) sqrt(2))
    #   n=2: "red red" -> 0, "red circle" L^2                      -> 1 / (sqrt(2) sqrt(2))
    #   n=3: no shared trigram -> 0;  n=4: norm 0 -> 0
    ref1 = 2 / math.sqrt(10) + 1 / 2
    # Ref "red circle": 1-gram red L, circle L (norm sqrt(2) L); 2-gram "red circle" L (norm L);
    # 1 bigram -> delta = 2 - 1 = 1 -> penalty exp(-1 / (2 * 6^2))
    ref2 = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72)
    cider_a = 10 * (ref1 + ref2) / 4 / 2                       # mean over n = 1..4, over 2 references, x10
    # B equals its reference: cosine 1 for n = 1, 2, 3 ("a" has weight 0, the others L), n = 4 empty
    cider_b = 10 * (1 + 1 + 1 + 0) / 4
    cands = [toks("red red circle"), toks("a blue square")]
    refs = [[toks("a red circle"), toks("red circle")], [toks("a blue square")]]
    scores = cider_d_scores(cands, refs)
    assert scores[0] == pytest.approx(cider_a, rel=1e-12)
    assert scores[1] == pytest.approx(cider_b, rel=1e-12)
    m = evaluate_captions({"A": "Red red circle.", "B": "a blue square"},
                          {"A": ["a red circle", "Red circle"], "B": ["A blue square."]})
    assert m.cider_d == pytest.approx((cider_a + cider_b) / 2, rel=1e-12)


def test_cider_d_quirks():
    # idf = log(N) - log(df): with one image every weight is 0 -> CIDEr-D = 0 even for a perfect caption
    assert cider_d_scores([toks("a red circle at the top")], [[toks("a red circle at the top")]]) == [0.0]
    # identical captions with >= 4 tokens and n-grams unique to their image -> cosine 1 for n = 1..4 -> 10
    cands = [toks("a red circle at the top"), toks("two green squares on the left side")]
    assert cider_d_scores(cands, [[c] for c in cands]) == pytest.approx([10.0, 10.0])
    # the length penalty counts bigrams: 1 extra token -> exp(-1/72) on every n
    s = cider_d_scores([toks("p q r s t"), toks("k l m n")], [[toks("p q r s")], [toks("k l m n")]])[0]
    # candidate 1-grams p q r s t vs ref p q r s (all idf L): 4 L^2 / (sqrt5 L * 2 L) = 2/sqrt5;
    # 2-grams 3 / (2 * sqrt3); 3-grams 2 / (sqrt3 * sqrt2); 4-grams 1 / (sqrt2 * 1)
    want = 10 * (2 / math.sqrt(5) + 3 / (2 * math.sqrt(3)) + 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert s == pytest.approx(want * math.exp(-1 / 72), rel=1e-12)


# ---- published pycocoevalcap outputs ------------------------------------------------------------

# jmhessel/clipscore README (commit dba93c8f4e016326c170a970734b1f72aa814d25), "Command Line" section:
# `python clipscore.py example/{good,bad}_captions.json example/images/ --references_json example/refs.json`
# prints pycocoevalcap's Bleu(4), Rouge and Cider (after its Java PTB tokenizer) for these inputs
# (example/refs.json, example/good_captions.json, example/bad_captions.json in that repository).
HESSEL_REFS = {
    "image1": ["two cats are sleeping next to each other.",
               "a grey cat is cuddling with an orange cat on a blanket.",
               "the orange cat is happy that the black cat is close to it."],
    "image2": ["a dog is wearing ear muffs as it lies on a carpet.",
               "a black dog and an orange cat are looking at the photographer.",
               "headphones are placed on a dogs ears."]}
HESSEL_GOOD = {"image1": "an orange cat and a grey cat are lying together.",
               "image2": "a black dog wearing headphones looks at the camera as an orange cat walks "
                         "in the background."}
HESSEL_BAD = {"image1": "a calico cat and a white cat are lying together.",
              "image2": "a black dog wearing a hat looks at the camera as a tabby walks in the background."}


@pytest.mark.parametrize("cands,published", [
    (HESSEL_GOOD, dict(bleu1=0.6667, bleu2=0.4899, bleu3=0.3469, bleu4=0.0000, rouge_l=0.4280, cider_d=0.5637)),
    (HESSEL_BAD, dict(bleu1=0.4815, bleu2=0.2404, bleu3=0.1359, bleu4=0.0000, rouge_l=0.3121, cider_d=0.2790)),
])
def test_matches_published_pycocoevalcap_outputs(cands, published):
    m = evaluate_captions(cands, HESSEL_REFS).to_dict()
    for k, v in published.items():
        assert m[k] == pytest.approx(v, abs=5e-5), k


# ---- evaluate_captions API ----------------------------------------------------------------------

def test_evaluate_captions_result_and_bad_inputs():
    m = evaluate_captions({"a": "a red circle"}, {"a": ["a red circle"], "unused": ["x"]})
    assert isinstance(m, CaptionMetrics) and m.n_images == 1
    d = m.to_dict()
    assert set(d) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d", "n_images", "clip_s", "ref_clip_s"}
    assert d["clip_s"] is None and d["ref_clip_s"] is None
    with pytest.raises(InputError, match="no references: 'b'"):
        evaluate_captions({"a": "x", "b": "y"}, {"a": ["x"]})
    with pytest.raises(InputError, match="empty"):
        evaluate_captions({"a": "x"}, {"a": []})
    with pytest.raises(InputError, match="list of strings"):
        evaluate_captions({"a": "x"}, {"a": "x"})
    with pytest.raises(InputError, match="no words"):
        evaluate_captions({"a": "x"}, {"a": ["x", " ... "]})
    with pytest.raises(InputError, match="no candidate"):
        evaluate_captions({}, {"a": ["x"]})
    with pytest.raises(InputError):
        evaluate_captions({"a": 3}, {"a": ["x"]})
    # an empty candidate is a (bad) caption, not an error: p1 = 1/1 ("q"), c = 0 + 1, r = 2 + 1
    m = evaluate_captions({"a": "", "b": "q"}, {"a": ["x y"], "b": ["q"]})
    assert m.bleu1 == pytest.approx(math.exp(1 - 3 / 1), rel=1e-6) and m.rouge_l == pytest.approx(0.5)


# ---- CLIP-S / RefCLIP-S -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_batch():
    from clipkit.shapes.data import render_pil, single_object_scenes
    from clipkit.shapes.world import canonical_caption
    scenes = single_object_scenes("test", 6)
    right = [canonical_caption(s) for s in scenes]
    wrong = right[1:] + right[:1]
    return render_pil(scenes, 64), right, wrong


def test_clip_s_definition_and_right_caption_wins(shapes_scorer, shapes_batch):
    images, right, wrong = shapes_batch
    good, bad = clip_s(shapes_scorer, images, right), clip_s(shapes_scorer, images, wrong)
    assert good.shape == (6,) and good.dtype == torch.float32
    assert (good > bad).all(), (good, bad)
    for caps, got in ((right, good), (wrong, bad)):
        cos = shapes_scorer.similarity(images, caps).diagonal()
        assert torch.allclose(got, 2.5 * cos.clamp(min=0), atol=1e-5)
    assert (good >= 0).all() and (good <= 2.5).all() and (bad == 0).any()      # negative cosines clip to 0
    pre = clip_s(shapes_scorer, images, right, prefix=HESSEL_PREFIX)
    cos = shapes_scorer.similarity(images, [f"A photo depicts {c}" for c in right]).diagonal()
    assert torch.allclose(pre, 2.5 * cos.clamp(min=0), atol=1e-5)
    with pytest.raises(InputError):
        clip_s(shapes_scorer, images, right[:3])


def test_ref_clip_s_is_harmonic_mean(shapes_scorer, shapes_batch):
    images, right, wrong = shapes_batch
    refs = [[w, "a shape on a black background"] for w in wrong]
    res = ref_clip_s(shapes_scorer, images, right, refs)
    cs = clip_s(shapes_scorer, images, right)
    cand = shapes_scorer.encode_texts(right)
    text = torch.stack([(shapes_scorer.encode_texts(r) @ c).max() for c, r in zip(cand, refs)]).clamp(min=0)
    assert torch.allclose(res.clip_s, cs, atol=1e-5)
    assert torch.allclose(res.ref_sim, text, atol=1e-5)
    assert torch.allclose(res.ref_clip_s, 2 * cs * text / (cs + text), atol=1e-5)
    # the candidate among its own references: text part = 1, RefCLIP-S = 2 CLIP-S / (CLIP-S + 1)
    own = ref_clip_s(shapes_scorer, images, right, [[r] + x for r, x in zip(right, refs)])
    assert torch.allclose(own.ref_sim, torch.ones(6), atol=1e-5)
    assert torch.allclose(own.ref_clip_s, 2 * cs / (cs + 1), atol=1e-5)
    assert (own.ref_clip_s >= res.ref_clip_s - 1e-6).all()
    assert dict(own.items()) == own.to_dict() == {"clip_s": own.mean_clip_s, "ref_clip_s": own.mean_ref_clip_s}
    with pytest.raises(InputError, match="empty"):
        ref_clip_s(shapes_scorer, images, right, refs[:-1] + [[]])
    with pytest.raises(InputError):
        ref_clip_s(shapes_scorer, images, right, refs[:-1])


def test_harmonic_mean_zero_safe():
    got = harmonic_mean(torch.tensor([0.0, 0.0, 2.5, 1.0]), torch.tensor([0.0, 0.7, 1.0, 1.0]))
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 5 / 3.5, 1.0]))


def test_evaluate_captions_with_clip(shapes_scorer, shapes_batch):
    images, right, wrong = shapes_batch
    keys = [f"img{i}" for i in range(6)]
    refs = {k: [r] for k, r in zip(keys, right)}
    imgs = dict(zip(keys, images))
    good = evaluate_captions(dict(zip(keys, right)), refs, scorer=shapes_scorer, images=imgs)
    bad = evaluate_captions(dict(zip(keys, wrong)), refs, scorer=shapes_scorer, images=imgs)
    assert good.clip_s == pytest.approx(clip_s(shapes_scorer, images, right).mean().item(), abs=1e-5)
    assert good.clip_s > bad.clip_s and good.ref_clip_s > bad.ref_clip_s
    assert good.bleu4 > bad.bleu4 and good.cider_d > bad.cider_d
    with pytest.raises(InputError, match="image"):
        evaluate_captions(dict(zip(keys, right)), refs, scorer=shapes_scorer, images={})
