"""Trans-LoRA (lorakit.transfer.trans_lora) on two tiny random Llamas of different widths
(hidden 32 -> 48) and, for the cross-tokenizer case, different vocabularies."""

import random

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.transfer import (
    Discriminator,
    TransferError,
    TransLoraConfig,
    as_examples,
    clean_candidates,
    completion_nll,
    distill_lora,
    filter_synthetic,
    synthesize_prompts,
    teacher_outputs,
    train_discriminator,
    transfer_lora,
)
from lorakit.transfer.trans_lora import answer_tokens, generation_prompt
from tests.conftest import logits_of, randomize, tiny_tokenizer

SEEDS = [("the quick brown fox", " a"), ("pack my box with jugs", " b"), ("moni muli bwanji", " c"),
         ("the lazy dog", " a"), ("five dozen liquor jugs", " b")]
TEMPLATE = "Q: {input}\nA:"


def llama(hidden: int, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def other_tokenizer():
    """A second byte-level BPE with a different corpus and vocabulary size (ids differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a cat sat on a mat with five dogs", "zikomo kwambiri anzanga"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def source_pair(seed: int = 0):
    """Tiny source Llama (hidden 32) with a non-trivial LoRA "default" and its tokenizer."""
    tok = tiny_tokenizer()
    model = llama(32, len(tok), seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target=["q_proj", "v_proj"]))
    randomize(model, std=0.3, seed=seed)
    return model, tok


def cfg(**kw) -> TransLoraConfig:
    base = {"prompt_template": TEMPLATE, "n_synthetic": 6, "candidates_per_round": 8, "max_rounds": 2,
            "gen_max_new_tokens": 10, "charset_filter": False, "disc_steps": 6, "steps": 6,
            "teacher_max_new_tokens": 4, "gen_batch_size": 4, "batch_size": 4, "threshold": 0.0}
    base.update(kw)
    return TransLoraConfig(**base)


def adapter_state(model, name):
    return {k: v.clone() for k, v in lorakit.core.io.adapter_tensors(model, name).items()}


# ----------------------------------------------------------------------------- config / inputs
@pytest.mark.parametrize("kw, match", [
    ({"prompt_template": "no field"}, "prompt_template"),
    ({"prompt_template": "{input} {other}"}, "prompt_template"),
    ({"generation_template": "{input}"}, "generation_template"),
    ({"generator": "teacher"}, "generator"),
    ({"kd": "hidden"}, "kd"),
    ({"n_synthetic": 0}, "n_synthetic"),
    ({"threshold": 1.5}, "threshold"),
    ({"gen_top_p": 0.0}, "gen_top_p"),
    ({"gen_temperature": -1.0}, "gen_temperature"),
    ({"disc_answers": ("yes", "yes")}, "disc_answers"),
    ({"disc_answers": ("yes",)}, "disc_answers"),
    ({"adapter": {"r": 4}}, "AdapterConfig"),
    ({"adapter_name": "x", "disc_name": "x"}, "differ"),
    ({"adapter_name": "../x"}, "invalid adapter name"),
    ({"disc_val_fraction": 1.0}, "disc_val_fraction"),
    ({"output_stop": ""}, "output_stop"),
    ({"lr": 0}, "lr"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TransLoraConfig(**kw)


def test_examples_parsing_and_errors():
    ex = as_examples(["x", ("y", " out")][:1] + ["z"])
    assert [e.input for e in ex] == ["x", "z"] and ex[0].output is None
    ex = as_examples([("a", " 1"), {"input": "b", "output": " 2"}])
    assert [(e.input, e.output) for e in ex] == [("a", " 1"), ("b", " 2")]
    with pytest.raises(ConfigError, match="empty"):
        as_examples([])
    with pytest.raises(ConfigError, match="either every example"):
        as_examples([("a", " 1"), "b"])
    with pytest.raises(ConfigError, match="non-blank"):
        as_examples(["  "])
    with pytest.raises(ConfigError, match="key 'input'"):
        as_examples([{"text": "a"}])


def test_answer_tokens_split_at_first_difference():
    tok = tiny_tokenizer()
    prefix, yes, no = answer_tokens(tok, ("yes", "no"))
    assert yes != no
    assert tok("Answer: yes", add_special_tokens=False)["input_ids"][: len(prefix) + 1] == prefix + [yes]
    with pytest.raises(ConfigError, match="prefix"):
        answer_tokens(tok, ("no", "nop"))


# ----------------------------------------------------------------------------- 1. synthesis
def test_generation_prompt_shows_shots_between_delimiters():
    p = generation_prompt(["alpha", "beta"], cfg())
    assert p.endswith("###\nalpha\n###\nbeta\n###\n")


def test_clean_candidates_drops_copies_duplicates_and_bad_charset():
    c = cfg(dedup_threshold=0.8)
    out = clean_candidates(["the lazy dog", " new one ", "new one", "", "another text here"], ["The lazy  dog"], c)
    assert out == ["new one", "another text here"]
    strict = cfg(charset_filter=True)
    assert clean_candidates(["bad \ufffd\ufffd text", "good words here"], ["seed"], strict) == ["good words here"]
    assert clean_candidates(["seen before"], ["seed"], c, exclude=["seen before"]) == []


def test_synthesize_prompts_deterministic_and_bounded():
    model, tok = source_pair()
    c = cfg(gen_max_new_tokens=8)
    seeds = [x for x, _ in SEEDS]
    a = synthesize_prompts(model, tok, seeds, 6, c, seed=3)
    b = synthesize_prompts(model, tok, seeds, 6, c, seed=3)
    d = synthesize_prompts(model, tok, seeds, 6, c, seed=4)
    assert a == b and a != d
    assert 0 < len(a) <= 6 and all(isinstance(t, str) and t == t.strip() and t for t in a)
    assert not set(a) & set(seeds)
    assert lorakit.adapter_names(model) == ["default"] and lorakit.core.inject.state(model).active == ["default"]


def test_generate_text_cuts_at_stop_string():
    from lorakit.transfer import generate_text

    model, tok = source_pair()
    free, ended = generate_text(model, tok, ["Q: the lazy dog"], 12, stop=None)
    assert ended == [False] and len(free[0]) > 4
    stop = free[0][3]
    cut, ended = generate_text(model, tok, ["Q: the lazy dog"], 12, stop=stop)
    assert cut[0] == free[0][: free[0].index(stop)] and ended == [True]


def test_single_line_stops_generation_at_newline(monkeypatch):
    import lorakit.transfer.trans_lora as tl

    seen = []
    real = tl.generate_text

    def spy(*args, **kw):
        seen.append(kw["stop"])
        return real(*args, **kw)

    monkeypatch.setattr(tl, "generate_text", spy)
    model, tok = source_pair()
    seeds = [x for x, _ in SEEDS]
    synthesize_prompts(model, tok, seeds, 2, cfg(), seed=5)
    synthesize_prompts(model, tok, seeds, 2, cfg(single_line=True), seed=5)
    assert seen == ["\n###", "\n"]


def test_synthesis_uses_the_base_model_not_the_adapter():
    model, tok = source_pair()
    seeds = [x for x, _ in SEEDS]
    c = cfg(gen_temperature=0.0)
    with_adapter = synthesize_prompts(model, tok, seeds, 3, c, seed=0)
    lorakit.deactivate(model)
    base_only = synthesize_prompts(model, tok, seeds, 3, c, seed=0)
    assert with_adapter == base_only


# ----------------------------------------------------------------------------- 2. discriminator
def planted(n, seed):
    """Distinguishable sets: 'real' lowercase sentences vs 'synthetic' digit/symbol strings."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "lazy", "dog", "pack", "box", "moni", "bwanji"]
    real = [" ".join(rng.choice(words) for _ in range(5)) for _ in range(n)]
    fake = ["".join(rng.choice("0123456789#%&") for _ in range(12)) for _ in range(n)]
    return real, fake


def test_discriminator_separates_planted_real_from_synthetic():
    model, tok = source_pair()
    real, fake = planted(24, 0)
    c = cfg(disc_steps=40, disc_lr=3e-3, disc_val_fraction=0.25, disc_r=8)
    disc, rep = train_discriminator(model, tok, real, fake, c)
    assert rep.n_real == 24 and rep.n_synthetic == 24 and rep.n_val == 12
    assert rep.losses[-1] < rep.losses[0]
    assert rep.train_accuracy >= 0.9 and rep.val_accuracy >= 0.9  # chance is 0.5
    r2, f2 = planted(10, 99)  # fresh samples
    p_real, p_fake = disc.score(r2), disc.score(f2)
    assert p_real.min() > p_fake.max()
    # only the discriminator is new on the model, the source adapter keeps its state
    assert set(lorakit.adapter_names(model)) == {"default", c.disc_name}
    assert lorakit.core.inject.state(model).active == ["default"]


def test_filter_keeps_only_scores_at_or_above_threshold():
    model, tok = source_pair()
    real, fake = planted(12, 1)
    disc, _ = train_discriminator(model, tok, real, fake, cfg(disc_steps=20, disc_lr=3e-3))
    texts = real[:4] + fake[:4]
    p = disc.score(texts)
    tau = float(p.median())
    kept, scores = filter_synthetic(disc, texts, tau)
    assert torch.allclose(scores, p)
    assert kept == [t for t, q in zip(texts, p.tolist()) if q >= tau]
    assert 0 < len(kept) < len(texts)
    assert filter_synthetic(disc, texts, 0.0)[0] == texts
    with pytest.raises(ConfigError, match="threshold"):
        filter_synthetic(disc, texts, 2.0)


def test_discriminator_errors():
    model, tok = source_pair()
    with pytest.raises(ConfigError, match="real and synthetic"):
        train_discriminator(model, tok, ["a"], [], cfg())
    with pytest.raises(AdapterError, match="not on this model"):
        Discriminator(model, tok, "nope", cfg())


# ----------------------------------------------------------------------------- 3./4. teacher + student
def test_teacher_outputs_use_the_adapter():
    model, tok = source_pair()
    inputs = [x for x, _ in SEEDS]
    c = cfg(teacher_max_new_tokens=6, output_stop=None)
    with_lora = teacher_outputs(model, tok, inputs, "default", c)
    assert len(with_lora) == len(inputs)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["q_proj"]), name="zero")  # B = 0: the base model
    base = teacher_outputs(model, tok, inputs, "zero", c)
    assert with_lora != base
    with pytest.raises(AdapterError, match="not on the source model"):
        teacher_outputs(model, tok, inputs, "missing", c)


def test_distillation_lowers_target_loss_on_teacher_outputs():
    src, tok = source_pair()
    tgt = llama(48, len(tok), 1)
    inputs = [x for x, _ in SEEDS]
    c = cfg(steps=30, lr=5e-3, teacher_max_new_tokens=4, output_stop=None)
    outs = teacher_outputs(src, tok, inputs, "default", c)
    prompts = [c.prompt(x) for x in inputs]
    before = completion_nll(tgt, tok, prompts, outs)
    losses = distill_lora(tgt, tok, inputs, outs, c, lorakit.LoraConfig(r=4, target="all-linear"))
    after = completion_nll(tgt, tok, prompts, outs)
    assert len(losses) == 30 and after < before - 0.5
    assert lorakit.core.inject.state(tgt).active == [c.adapter_name]


def test_logit_distillation_needs_one_vocabulary_and_lowers_kl():
    src, tok = source_pair()
    tgt = llama(48, len(tok), 1)
    inputs = [x for x, _ in SEEDS]
    c = cfg(kd="logits", steps=25, lr=5e-3, output_stop=None)
    outs = teacher_outputs(src, tok, inputs, "default", c)
    losses = distill_lora(tgt, tok, inputs, outs, c, lorakit.LoraConfig(r=4), teacher=(src, tok, "default"))
    assert losses[-1] < 0.5 * losses[0]
    tgt2 = llama(48, 280, 2)
    with pytest.raises(ConfigError, match="one vocabulary"):
        distill_lora(tgt2, other_tokenizer(), inputs, outs, c, lorakit.LoraConfig(r=4), teacher=(src, tok, "default"))
    with pytest.raises(ConfigError, match="teacher"):
        distill_lora(tgt2, other_tokenizer(), inputs, outs, c, lorakit.LoraConfig(r=4))


# ----------------------------------------------------------------------------- whole transfer
def test_transfer_across_sizes_and_tokenizers_saves_and_loads(tmp_path):
    src, tok = source_pair()
    tok2 = other_tokenizer()
    tgt = llama(48, len(tok2), 1)
    c = cfg()
    out, rep = transfer_lora(src, tok, "default", tgt, tok2, SEEDS, c)
    assert out is tgt
    assert rep.n_seeds == 5 and rep.n_generated == 8 * rep.rounds
    assert 0 < rep.n_kept <= c.n_synthetic and rep.n_kept <= rep.n_clean <= rep.n_generated
    assert rep.discriminator["n_real"] == 5 and rep.discriminator["train_accuracy"] is not None
    assert rep.teacher_agreement is not None and len(rep.distill_losses) == c.steps
    assert set(rep.seconds) >= {"disc_synthesis", "disc_train", "synthesis", "filter", "teacher", "distill"}
    # the source model is left as it was: no discriminator, same active adapters
    assert lorakit.adapter_names(src) == ["default"] and lorakit.core.inject.state(src).active == ["default"]
    # the target adapter copies the source adapter's config and is a normal adapter on disk
    assert lorakit.core.inject.state(tgt).configs[c.adapter_name].r == 4
    path = lorakit.save(tgt, tmp_path / "tl", name=c.adapter_name)
    fresh = llama(48, len(tok2), 1)
    lorakit.load(fresh, path)
    ids = torch.randint(3, len(tok2), (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits_of(fresh, ids), logits_of(tgt, ids), atol=1e-6)
    assert not torch.allclose(logits_of(llama(48, len(tok2), 1), ids), logits_of(tgt, ids), atol=1e-4)


def test_transfer_is_deterministic_given_seed():
    def run(seed):
        src, tok = source_pair()
        tgt = llama(48, len(tok), 1)
        _, rep = transfer_lora(src, tok, "default", tgt, tok, SEEDS, cfg(seed=seed))
        return rep, adapter_state(tgt, "trans_lora")

    (r1, s1), (r2, s2), (r3, _) = run(0), run(0), run(1)
    assert r1.kept_examples == r2.kept_examples and r1.distill_losses == r2.distill_losses
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1.kept_examples != r3.kept_examples


def test_transfer_uses_a_given_discriminator_and_filters():
    src, tok = source_pair()
    real, fake = planted(12, 2)
    c = cfg(threshold=0.5, disc_steps=20, disc_lr=3e-3, n_synthetic=20, candidates_per_round=12, max_rounds=1)
    disc, _ = train_discriminator(src, tok, real, fake, c)
    tgt = llama(48, len(tok), 1)
    _, rep = transfer_lora(src, tok, "default", tgt, tok, SEEDS, c, discriminator=disc)
    assert rep.discriminator is None  # not retrained
    kept = [e["input"] for e in rep.kept_examples]
    assert kept and bool((disc.score(kept) >= 0.5).all())
    if rep.rejected_examples:
        assert bool((disc.score(rep.rejected_examples) < 0.5).all())
    assert rep.n_kept + len(rep.rejected_examples) <= rep.n_clean
    assert c.disc_name in lorakit.adapter_names(src)  # a given discriminator is not deleted
    # nothing passes a threshold of 1: a clear error, and the target is left untouched
    tgt2 = llama(48, len(tok), 1)
    with pytest.raises(TransferError, match="no synthetic input survived") as err:
        transfer_lora(src, tok, "default", tgt2, tok, SEEDS, cfg(threshold=1.0), discriminator=disc)
    assert lorakit.adapter_names(tgt2) == []
    failed = err.value.report  # what was measured before the failure comes with the error
    assert failed.n_kept == 0 and failed.n_clean > 0
    assert 0.0 <= failed.p_real["min"] <= failed.p_real["median"] <= failed.p_real["max"] < 1.0


def test_unfiltered_transfer_skips_the_discriminator():
    src, tok = source_pair()
    tgt = llama(48, len(tok), 1)
    _, rep = transfer_lora(src, tok, "default", tgt, tok, [x for x, _ in SEEDS], cfg(filter=False))
    assert rep.discriminator is None and rep.teacher_agreement is None
    assert rep.n_kept == min(6, rep.n_clean)


def test_transfer_errors_leave_models_untouched():
    src, tok = source_pair()
    tgt = llama(48, len(tok), 1)
    with pytest.raises(ConfigError, match="empty"):
        transfer_lora(src, tok, "default", tgt, tok, [], cfg())
    with pytest.raises(AdapterError, match="not on the source model"):
        transfer_lora(src, tok, "nope", tgt, tok, SEEDS, cfg())
    with pytest.raises(ConfigError, match="same object"):
        transfer_lora(src, tok, "default", src, tok, SEEDS, cfg())
    with pytest.raises(ConfigError, match="one vocabulary"):
        transfer_lora(src, tok, "default", llama(48, 280, 1), other_tokenizer(), SEEDS, cfg(kd="logits"))
    wrong = [(x, " zebra crossing") for x, _ in SEEDS]
    with pytest.raises(ConfigError, match="mismatched task"):
        transfer_lora(src, tok, "default", tgt, tok, wrong, cfg(min_teacher_agreement=1.0))
    with pytest.raises(ConfigError, match="matched no adaptable module"):
        transfer_lora(src, tok, "default", tgt, tok, SEEDS, cfg(adapter=lorakit.LoraConfig(target=["nonexistent"])))
    assert lorakit.adapter_names(src) == ["default"] and lorakit.adapter_names(tgt) == []
    lorakit.inject(tgt, lorakit.LoraConfig(r=2), name="trans_lora")
    with pytest.raises(AdapterError, match="already has an adapter"):
        transfer_lora(src, tok, "default", tgt, tok, SEEDS, cfg())


# ----------------------------------------------------------------------------- benchmark helpers
def test_choice_logprobs_equal_full_scoring_and_label_accuracy():
    from lorakit.transfer import Example, completion_logprobs
    from lorakit.transfer.benchmark import choice_logprobs, label_accuracy, snippet

    model, tok = source_pair()
    prompts = ["Q: the lazy dog\nA:", "Q: moni\nA:"]
    choices = [" a", " brown fox", " zikomo kwambiri"]  # 1 and several tokens
    fast = choice_logprobs(model, tok, prompts, choices)
    full = completion_logprobs(model, tok, [p for p in prompts for _ in choices], choices * len(prompts))
    assert torch.allclose(fast, torch.tensor([s for s, _ in full]).view(2, 3), atol=1e-4)
    exs = [Example("the lazy dog", " a"), Example("moni", " brown fox")]
    acc = label_accuracy(model, tok, exs, ["a", "brown fox", "zikomo kwambiri"], TEMPLATE, adapters=["default"])
    gold = torch.tensor([0, 1])
    assert acc == float((fast.argmax(1) == gold).float().mean())
    assert snippet("one  two\nthree four", 12) == "one two"


def test_remaining_guards():
    from lorakit.transfer.benchmark import choice_logprobs, make_target, run_transfer_benchmark
    from lorakit.transfer.trans_lora import encode_pairs

    src, tok = source_pair()
    tgt = llama(48, len(tok), 1)
    # a discriminator name already taken on the source, or a discriminator living on the target
    lorakit.inject(src, lorakit.LoraConfig(r=2), name="trans_lora_disc")
    with pytest.raises(AdapterError, match="already has an adapter 'trans_lora_disc'"):
        transfer_lora(src, tok, "default", tgt, tok, SEEDS, cfg())
    lorakit.inject(tgt, lorakit.LoraConfig(r=2), name="d")
    with pytest.raises(ConfigError, match="must live on the source"):
        transfer_lora(src, tok, "default", tgt, tok, SEEDS, cfg(), discriminator=Discriminator(tgt, tok, "d", cfg()))
    with pytest.raises(ConfigError, match="no room"):
        Discriminator(src, tok, "trans_lora_disc", cfg(max_length=2)).score(["some text"])
    # a merged source adapter cannot be switched off for generation
    lorakit.merge(src, ["default"])
    with pytest.raises(AdapterError, match="merged"):
        transfer_lora(src, tok, "default", llama(48, len(tok), 1), tok, SEEDS, cfg(disc_name="other"))
    # answer words that cannot be told apart fail before the model changes
    src2, _ = source_pair()
    with pytest.raises(ConfigError, match="prefix"):
        train_discriminator(src2, tok, ["a b"], ["c d"], cfg(disc_answers=("no", "nop")))
    assert lorakit.adapter_names(src2) == ["default"]
    # data helpers
    with pytest.raises(ConfigError, match="2 prompts but 1"):
        encode_pairs(tok, ["a", "b"], ["c"], 16)
    with pytest.raises(ConfigError, match="has no tokens"):
        encode_pairs(tok, ["a"], [""], 16)
    with pytest.raises(ConfigError, match="needs an adapter config"):
        distill_lora(tgt, tok, ["a"], [" b"], cfg())
    with pytest.raises(TransferError, match="non-blank output"):
        distill_lora(tgt, tok, ["a"], ["  "], cfg(), lorakit.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="at least one token"):
        choice_logprobs(tgt, tok, ["a"], [" b", ""])
    with pytest.raises(ConfigError, match="n_seeds"):
        run_transfer_benchmark(n_train=3, n_seeds=5)
    with pytest.raises(ConfigError, match="unknown TransLoraConfig"):
        run_transfer_benchmark(overrides={"generatr": "source"})
    with pytest.raises(ConfigError, match="generator"):
        run_transfer_benchmark(overrides={"generator": "teacher"})
    with pytest.raises(ConfigError, match="before injecting adapters"):
        make_target("pruned", src2, tok)
