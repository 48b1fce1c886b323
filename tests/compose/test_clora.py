"""CLoRA for text generation (compose/clora.py): per-adapter rows, attention masks, contrastive
guidance of a shared latent, mask-weighted fusion of the adapters' logits.

METHODS.md: "compose several LoRAs at inference with per-adapter masks/attention so each controls
its own part of the output (contrastive guidance) — for generation with ≥2 adapters" —
test_one_hot_mask_equals_generating_with_that_adapter_alone, test_equal_masks_average_the_logits,
test_average_differs_from_the_plain_sum_and_is_close_to_the_linear_merge,
test_guidance_lowers_the_contrastive_loss_and_moves_the_output, test_batched_rows_equal_separate_forwards.
"""

import pytest
import torch

import lorakit
from lorakit.compose import merge_adapters
from lorakit.compose.clora import (
    CloraConfig,
    embed_rows,
    generate,
    info_nce,
    masks_from_scores,
    resolve_concepts,
    rows_forward,
)
from lorakit.errors import AdapterError, ConfigError
from tests.conftest import logits_of, randomize, tiny_gpt2, tiny_llama, tiny_tokenizer

NAMES = ["a", "b", "c"]
PROMPT = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(0)).tolist()
CONCEPTS = {"a": [(1, 3)], "b": [(4, 6)], "c": [(7, 9), (10, 11)]}


def composed(factory=tiny_llama, names=NAMES, std=0.3):
    """A tiny model with adapters `names`, each with its own random A and B (so they differ)."""
    m = factory()
    for i, n in enumerate(names):
        lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, target="all-linear"), name=n, activate=False)
        randomize(m, n, seed=10 + i, std=std)
    return m


def alone(model, name, ids):
    """Logits (L, V) of `ids` with only adapter `name` active (a separate, unrouted forward)."""
    lorakit.activate(model, [name])
    try:
        return logits_of(model, torch.tensor([ids]))[0]
    finally:
        lorakit.activate(model, [])


def step_logits(model, name, out):
    """Adapter `name`'s logits at every generated step of `out`, teacher-forced: (T, V)."""
    full = out.prompt_ids + out.tokens
    p = len(out.prompt_ids)
    return alone(model, name, full)[p - 1: p - 1 + len(out.tokens)]


# -- pure math -----------------------------------------------------------------------------
def ntxent_loop(emb, labels, tau):
    """pytorch-metric-learning's NTXentLoss, written as loops over positive pairs."""
    z = torch.nn.functional.normalize(emb, dim=1)
    s = z @ z.T / tau
    losses = []
    for a in range(len(labels)):
        negs = [s[a, k] for k in range(len(labels)) if labels[k] != labels[a]]
        for p in range(len(labels)):
            if p != a and labels[p] == labels[a]:
                den = torch.exp(s[a, p]) + sum(torch.exp(x) for x in negs)
                losses.append(-torch.log(torch.exp(s[a, p]) / den))
    return torch.stack(losses).mean() if losses else torch.tensor(0.0)


def test_info_nce_matches_the_ntxent_formula():
    g = torch.Generator().manual_seed(0)
    emb = torch.rand(9, 6, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2])
    for tau in (0.5, 0.1):
        torch.testing.assert_close(info_nce(emb, labels, tau), ntxent_loop(emb, labels, tau), rtol=1e-5, atol=1e-6)
    # separated clusters score lower than mixed ones
    sep = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0.9, 0.1]])
    mixed = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0.1, 0], [0, 0.9, 0.1]])
    lab = torch.tensor([0, 0, 1, 1])
    assert info_nce(sep, lab) < info_nce(mixed, lab) - 0.5
    assert info_nce(emb[:3], torch.tensor([0, 1, 2])) == 0  # no positive pair
    x = emb[:3].clone().requires_grad_(True)
    info_nce(x, torch.tensor([0, 0, 0])).backward()  # no negatives: loss 0, graph intact
    assert x.grad is not None and float(x.grad.abs().sum()) == 0
    with pytest.raises(ValueError, match="labels"):
        info_nce(emb, labels[:4])


def test_mask_rules():
    s = torch.tensor([0.1, 0.3, 0.2])
    m = masks_from_scores(s, "softmax", mask_temperature=0.5)
    torch.testing.assert_close(m, s**2 / (s**2).sum())  # M_i ∝ s_i^{1/τ}
    torch.testing.assert_close(masks_from_scores(s * 0.01, "softmax", mask_temperature=0.5), m)  # scale-free
    torch.testing.assert_close(masks_from_scores(s, "softmax", mask_temperature=1.0), s / s.sum())
    assert masks_from_scores(s, "softmax", mask_temperature=0.01).max() > 0.999  # cold → argmax
    assert masks_from_scores(s, "softmax", mask_temperature=100.0).max() < 0.34  # hot → uniform
    assert masks_from_scores(torch.tensor([0.0, 0.2, 0.0]), "softmax")[1] > 0.999  # no attention → no share
    # threshold: 1[s_i > α · running max of s_i], normalised; each adapter is compared with its own past
    torch.testing.assert_close(masks_from_scores(s, "threshold", threshold=0.6), torch.full((3,), 1 / 3))
    run = torch.tensor([1.0, 0.3, 0.25])  # adapter 0 was much stronger before: 0.1 is now below 0.6·1.0
    torch.testing.assert_close(masks_from_scores(s, "threshold", threshold=0.6, running_max=run),
                               torch.tensor([0.0, 1.0, 1.0]) / 2)
    # nothing above threshold -> the first adapter takes the position (the reference's background)
    low = masks_from_scores(torch.tensor([0.01, 0.02, 0.01]), "threshold", threshold=0.9,
                            running_max=torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(low, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(masks_from_scores(s, "fixed", weights=[1, 3, 0]), torch.tensor([0.25, 0.75, 0.0]))
    with pytest.raises(ConfigError, match="3 mask_weights"):
        masks_from_scores(s, "fixed", weights=[1, 1])
    with pytest.raises(ConfigError, match="mask must be"):
        masks_from_scores(s, "max")


def test_resolve_concepts_from_text_and_ranges():
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog."
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    names, pos = resolve_concepts({"x": "quick brown", "y": ["lazy dog", (0, 1)]}, ids, text, offsets)
    assert names == ["x", "y"]
    assert "quick brown" in tok.decode([ids[k] for k in pos[0]])
    assert "lazy dog" in tok.decode([ids[k] for k in pos[1] if k > 0]) and 0 in pos[1]
    assert not set(pos[0]) & set(pos[1])


# -- batched rows --------------------------------------------------------------------------
def test_batched_rows_equal_separate_forwards():
    m = composed()
    m.set_attn_implementation("eager")
    ids = torch.tensor([PROMPT] * 3)
    with torch.no_grad():
        out = rows_forward(m, NAMES, embed_rows(m, NAMES, ids), attentions=True)
        nxt = rows_forward(m, NAMES, embed_rows(m, NAMES, torch.full((3, 1), 7)), out.cache)
    for i, n in enumerate(NAMES):
        lorakit.activate(m, [n])
        with torch.no_grad():
            ref = m(input_ids=ids[:1], output_attentions=True)
            ref_next = m(input_ids=torch.tensor([PROMPT + [7]])).logits[0, -1]
        torch.testing.assert_close(out.logits[i], ref.logits[0], rtol=0, atol=1e-5)
        for a, b in zip(out.attentions, ref.attentions):
            torch.testing.assert_close(a[i], b[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(nxt.logits[i, -1], ref_next, rtol=0, atol=1e-5)
    assert not torch.allclose(out.logits[0], out.logits[1], atol=1e-3)  # the adapters differ


# -- generation ----------------------------------------------------------------------------
def test_shapes_determinism_and_restored_attention():
    m = composed()
    assert m.config._attn_implementation == "sdpa"
    kw = {"max_new_tokens": 5, "guidance_steps": 2, "guided_tokens": 3}
    out = generate(m, None, PROMPT, CONCEPTS, **kw)
    again = generate(m, None, PROMPT, CONCEPTS, **kw)
    assert m.config._attn_implementation == "sdpa"  # eager only while generating
    assert out.adapters == NAMES and out.prompt_ids == PROMPT and len(out.tokens) == 5
    assert out.masks.shape == (5, 3) and out.scores.shape == (5, 3) and out.logits.shape == (5, 128)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(5))
    assert (out.scores > 0).all() and (out.scores <= 1).all()
    assert [len(v) for v in out.losses] == [3, 3, 3, 0, 0]
    assert out.concept_positions == [[1, 2], [4, 5], [7, 8, 10]]
    assert out.tokens == again.tokens and out.losses == again.losses
    torch.testing.assert_close(out.logits, again.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.masks, again.masks, rtol=0, atol=0)
    assert out.text is None and out.finish_reason == "length"
    hot = [generate(m, None, PROMPT, CONCEPTS, max_new_tokens=6, guidance_steps=0, sample_temperature=5.0, seed=s)
           for s in (1, 1, 2)]
    assert hot[0].tokens == hot[1].tokens != hot[2].tokens  # sampling: seeded, reproducible
    last = generate(m, None, PROMPT, CONCEPTS, layers=[1], **kw)
    assert not torch.allclose(last.scores[0], out.scores[0])  # the maps come from the chosen layers


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_one_hot_mask_equals_generating_with_that_adapter_alone(factory):
    m = composed(factory)
    runs = []
    for i, n in enumerate(NAMES):
        w = [0.0] * 3
        w[i] = 1.0
        out = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=6, guidance_steps=0, mask="fixed", mask_weights=w)
        ref = step_logits(m, n, out)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
        assert out.tokens == ref.argmax(-1).tolist()  # = greedy decoding with adapter i alone
        runs.append(out.tokens)
    lorakit.activate(m, ["b"])
    hf = m.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    lorakit.activate(m, [])
    assert hf[0, len(PROMPT):].tolist() == runs[1]
    assert len({tuple(r) for r in runs}) > 1  # different adapters write different text


def test_equal_masks_average_the_logits():
    m = composed()
    out = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=5, guidance_steps=0, mask="fixed", mask_weights=[1, 1, 1])
    per = torch.stack([step_logits(m, n, out) for n in NAMES])  # (3, T, V)
    torch.testing.assert_close(out.logits, per.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.masks, torch.full((5, 3), 1 / 3))
    assert not torch.allclose(out.logits, per.sum(0), atol=1e-2)  # an average, not a sum


def test_average_differs_from_the_plain_sum_and_is_close_to_the_linear_merge():
    # small adapters: the network is nearly linear in ΔW, so avg_i ℓ(W0+ΔW_i) ≈ ℓ(W0 + mean ΔW)
    m = composed(std=0.05)
    out = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=1, guidance_steps=0, mask="fixed", mask_weights=[1, 1, 1])
    clora = out.logits[0]
    x = torch.tensor([PROMPT])
    base = logits_of(m, x)[0, -1]
    lorakit.activate(m, NAMES)  # every adapter on at once: y = W0x + Σ_i ΔW_i x
    plain_sum = logits_of(m, x)[0, -1]
    merge_adapters(m, NAMES, method="cat", out_name="sum")  # the same sum as one merged LoRA
    torch.testing.assert_close(logits_of(m, x)[0, -1], plain_sum, rtol=0, atol=1e-5)
    merge_adapters(m, NAMES, method="linear", out_name="avg")  # W0 + (1/3) Σ_i ΔW_i
    linear = logits_of(m, x)[0, -1]
    gap_sum = (clora - plain_sum).abs().max()
    assert gap_sum > 1e-2
    assert (clora - linear).abs().max() < 0.2 * gap_sum
    # to first order the sum moves the logits 3x as far from the base as the average does
    ratio = (plain_sum - base).norm() / (clora - base).norm()
    assert 2.5 < ratio < 3.5


def test_guidance_lowers_the_contrastive_loss_and_moves_the_output():
    m = composed()
    out = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=4, guidance_steps=4, guided_tokens=3, lr=0.02)
    assert [len(v) for v in out.losses] == [5, 5, 5, 0]
    for losses in out.losses[:3]:
        assert losses[-1] < losses[0] - 1e-3
        assert min(losses[1:]) < losses[0]
    plain = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=4, guidance_steps=0)
    assert all(v == [] for v in plain.losses)
    assert not torch.allclose(out.logits[0], plain.logits[0], atol=1e-4)  # the latent moved the output
    frozen = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=4, guidance_steps=4, guided_tokens=3, lr=0.0)
    torch.testing.assert_close(frozen.logits, plain.logits, rtol=0, atol=1e-5)  # lr 0: no change at all


def test_threshold_masks_are_binary_shares():
    m = composed()
    out = generate(m, None, PROMPT, CONCEPTS, max_new_tokens=5, guidance_steps=0, mask="threshold", mask_threshold=0.9)
    for row in out.masks:
        on = row[row > 0]
        assert len(on) >= 1 and torch.allclose(on, torch.full_like(on, 1 / len(on)))
    assert (out.masks[0] > 0).all()  # first step: every adapter is at its own maximum
    assert (out.masks[1:] == 0).any()  # later the threshold switches adapters off


def test_text_prompt_and_text_concepts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for i, n in enumerate(["x", "y"]):
        lorakit.inject(m, lorakit.LoraConfig(r=2, target=["q_proj", "v_proj"]), name=n)
        randomize(m, n, seed=i)
    text = "The quick brown fox jumps over the lazy dog."
    out = generate(m, tok, text, {"x": "quick brown fox", "y": "lazy dog"}, max_new_tokens=4, guidance_steps=1)
    assert out.prompt_ids == tok(text)["input_ids"]
    assert isinstance(out.text, str) and out.masks.shape[1] == 2
    assert out.text == tok.decode(out.tokens, skip_special_tokens=True)
    stop = generate(m, tok, text, {"x": "quick brown fox", "y": "lazy dog"}, max_new_tokens=4, guidance_steps=1,
                    stop_token_ids=[out.tokens[0]])
    assert stop.tokens == out.tokens[:1] and stop.finish_reason == "stop"


# -- errors --------------------------------------------------------------------------------
def test_errors():
    m = composed()
    with pytest.raises(ConfigError, match="at least 2 adapters"):
        generate(m, None, PROMPT, {"a": [(1, 3)]})
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        generate(m, None, PROMPT, {"a": [(1, 3)], "zz": [(4, 5)]})
    with pytest.raises(ValueError, match=r"\(10, 13\) of adapter 'b' lies outside the prompt"):
        generate(m, None, PROMPT, {"a": [(1, 3)], "b": [(10, 13)]})
    with pytest.raises(ValueError, match="outside the prompt"):
        generate(m, None, PROMPT, {"a": [(3, 3)], "b": [(4, 5)]})
    with pytest.raises(ValueError, match="belongs to the concepts of both 'a' and 'b'"):
        generate(m, None, PROMPT, {"a": [(1, 4)], "b": [(3, 5)]})
    with pytest.raises(ConfigError, match="is text"):
        generate(m, None, PROMPT, {"a": "cat", "b": [(3, 5)]})
    with pytest.raises(ConfigError, match="non-empty list"):
        generate(m, None, PROMPT, {"a": [], "b": [(3, 5)]})
    with pytest.raises(ConfigError, match="2 weights for 3 adapters"):
        generate(m, None, PROMPT, CONCEPTS, mask="fixed", mask_weights=[1, 1])
    with pytest.raises(ConfigError, match="layers"):
        generate(m, None, PROMPT, CONCEPTS, layers=[2])
    with pytest.raises(ConfigError, match="either config or keyword"):
        generate(m, None, PROMPT, CONCEPTS, CloraConfig(), lr=0.1)
    lorakit.merge(m, ["a"])
    with pytest.raises(AdapterError, match="merged"):
        generate(m, None, PROMPT, CONCEPTS)
    with pytest.raises(ValueError, match="'zebra' of adapter 'a' does not occur"):
        resolve_concepts({"a": "zebra", "b": "fox"}, [0] * 3, "the fox", [(0, 3), (3, 4), (4, 7)])


@pytest.mark.parametrize("bad, match", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"mask_temperature": -1}, "mask_temperature"),
    ({"mask": "max"}, "mask must be one of"),
    ({"mask_weights": [1, 1]}, "exactly when mask='fixed'"),
    ({"mask": "fixed"}, "exactly when mask='fixed'"),
    ({"mask": "fixed", "mask_weights": [0, 0]}, "positive weight"),
    ({"mask": "fixed", "mask_weights": [1, -1]}, r"mask_weights\[1\]"),
    ({"lr": -0.1}, "lr must be"),
    ({"lr": float("inf")}, "lr must be"),
    ({"guidance_steps": -1}, "guidance_steps"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"mask_threshold": 1.5}, "mask_threshold"),
    ({"layers": []}, "at least one decoder layer"),
    ({"layers": [-1]}, r"layers\[0\]"),
    ({"seed": 1.5}, "seed"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        CloraConfig(**bad)
