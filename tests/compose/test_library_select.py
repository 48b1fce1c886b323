"""LoRA library selection with K shots (arXiv:2408.15915): K-shot loss / accuracy / embedding
ranking, ΔW-diversity of the chosen group, and the merged or MoE mixture of the chosen LoRAs."""

import json
import math
import shutil

import pytest
import torch

import lorakit
from lorakit.compose.library import (
    LibraryConfig,
    LibraryRunConfig,
    choose_group,
    combine_scores,
    delta_similarity,
    run_library,
    select_from_library,
)
from lorakit.core.inject import adapter_modules
from lorakit.core.io import export_peft
from lorakit.data.less import encode_examples
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.models import load_model
from tests.conftest import logits_of, randomize, tiny_llama, tiny_tokenizer

LABELS = ["moni", "zikomo", "bwino"]
KSHOT = [
    {"prompt": "Q: hello there A:", "response": " moni"},
    {"prompt": "Q: thank you A:", "response": " zikomo"},
    {"prompt": "Q: I am fine A:", "response": " bwino"},
    {"prompt": "Q: many thanks A:", "response": " zikomo"},
]
TASK = KSHOT + [
    {"prompt": "Q: hi A:", "response": " moni"},
    {"prompt": "Q: thanks a lot A:", "response": " zikomo"},
    {"prompt": "Q: all good A:", "response": " bwino"},
    {"prompt": "Q: good morning A:", "response": " moni"},
]
OTHER = [
    {"prompt": "Q: hello there A:", "response": " Pack my box with five dozen liquor jugs."},
    {"prompt": "Q: what jumps? A:", "response": " The quick brown fox jumps over the lazy dog."},
    {"prompt": "Q: a box? A:", "response": " Pack my box with five dozen liquor jugs."},
    {"prompt": "Q: the dog A:", "response": " The quick brown fox jumps over the lazy dog."},
]
TARGET = ["q_proj", "v_proj", "down_proj"]


def train_lora(model, tok, records, name, r, seed, steps=40, lr=5e-2):
    torch.manual_seed(seed)
    lorakit.inject(model, LoraConfig(r=r, alpha=2 * r, target=TARGET), name=name)
    enc = encode_examples(tok, records, 64)
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.stack([torch.nn.functional.pad(e["input_ids"], (0, width - len(e["input_ids"])), value=2) for e in enc])
    labels = torch.stack([torch.nn.functional.pad(e["labels"], (0, width - len(e["labels"])), value=-100) for e in enc])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama + tokenizer as a local model directory; weights drawn with std 0.1 (not
    0.02) so that a few LoRA steps move its near-uniform next-token distribution visibly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, initializer_range=0.1,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def library(tmp_path_factory, base_dir):
    """A library of four LoRAs for the tiny base model, of three ranks, one in PEFT's format:
    fit (trained on the K-shot task), dup (a near copy of fit, PEFT format), other (trained on
    another task), noise (random)."""
    root = tmp_path_factory.mktemp("lib")
    for n, records, r, seed, steps in (("fit", TASK, 4, 1, 40), ("other", OTHER, 8, 2, 20)):
        model, tok = load_model(str(base_dir))
        train_lora(model, tok, records, n, r=r, seed=seed, steps=steps)
        lorakit.save(model, root / n, name=n)
    model, tok = load_model(str(base_dir))
    lorakit.inject(model, LoraConfig(r=2, target=TARGET), name="noise")
    randomize(model, "noise", seed=3, std=0.2)
    lorakit.save(model, root / "noise", name="noise")
    model, tok = load_model(str(base_dir))
    lorakit.load(model, root / "fit", name="dup")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for a in adapter_modules(model, "dup").values():
            a.lora_B.weight.mul_(0.85).add_(torch.randn(a.lora_B.weight.shape, generator=g) * 1e-3)
    export_peft(model, root / "dup", name="dup")  # PEFT format: no lorakit section, no base hash
    return root


def fresh(base_dir):
    return load_model(str(base_dir))


def test_fit_adapter_ranks_first_diverse_group_and_merged_mixture(library, base_dir, tmp_path):
    model, tok = fresh(base_dir)
    ids = torch.tensor([[0, 5, 17, 40, 99, 120, 200, 7]])
    base_logits = logits_of(model, ids)
    res = select_from_library(model, tok, library, KSHOT, LibraryConfig(top_m=2, labels=LABELS, mix="merge"))
    table = res.table()
    assert res.adapters[0].name == "fit", table
    fit = res.adapters[0]
    assert fit.gain > 0 and fit.accuracy == 1.0 and fit.ppl < res.base["ppl"], table
    assert {a.name: a.rank for a in res.adapters} == {"fit": 4, "dup": 4, "other": 8, "noise": 2}
    assert res.similarity["fit"]["dup"] > 0.95 and res.similarity["fit"]["other"] < 0.5
    assert res.chosen[0] == "fit" and "dup" not in res.chosen, table  # diversity: no near-duplicate
    assert [a.selected for a in res.adapters].count(True) == 2
    assert "fit" in table and "*" in table
    # the mixture: ΔW = (ΔW_fit + ΔW_x) / 2, the only active adapter, and it saves and loads
    assert res.mixture == "library" and lorakit.adapter_names(model) == ["library"]
    out = logits_of(model, ids)
    assert not torch.allclose(out, base_logits, atol=1e-4)
    lorakit.save(model, tmp_path / "mix", name="library")
    other, _ = fresh(base_dir)
    lorakit.load(other, tmp_path / "mix")
    torch.testing.assert_close(logits_of(other, ids), out, rtol=0, atol=1e-5)
    json.dumps(res.to_dict())  # JSON-serialisable


def test_without_diversity_the_near_duplicate_is_picked(library, base_dir):
    model, tok = fresh(base_dir)
    res = select_from_library(model, tok, library, KSHOT, LibraryConfig(top_m=2, labels=LABELS, diversity=0.0,
                                                                        mix="none"))
    assert set(res.chosen) == {"fit", "dup"}, res.table()
    assert res.mixture is None and lorakit.adapter_names(model) == []


def test_moe_mixture_of_the_chosen_loras_runs_and_round_trips(library, base_dir, tmp_path):
    model, tok = fresh(base_dir)
    res = select_from_library(model, tok, library, KSHOT, LibraryConfig(top_m=3, mix="moe"), name="expert")
    assert lorakit.get_method(lorakit.core.inject.state(model).configs["expert"].method).name == "meteora"
    mods = adapter_modules(model, "expert")
    assert all(m.lora_A.shape[0] == 3 and not m.lora_A.requires_grad and m.gate.requires_grad for m in mods.values())
    ids = torch.tensor([[0, 11, 52, 98, 3]])
    out = logits_of(model, ids)
    assert torch.isfinite(out).all()
    lorakit.save(model, tmp_path / "moe", name="expert")
    other, _ = fresh(base_dir)
    lorakit.load(other, tmp_path / "moe")
    torch.testing.assert_close(logits_of(other, ids), out, rtol=0, atol=1e-5)
    assert len(res.chosen) == 3
    enc = encode_examples(tok, KSHOT[:1], 64)[0]  # the gates train on K-shot data, the experts stay frozen
    model.train()
    model(input_ids=enc["input_ids"][None], labels=enc["labels"][None]).loss.backward()
    assert all(m.gate.grad is not None and m.gate.grad.abs().sum() > 0 for m in mods.values())
    assert all(m.lora_A.grad is None for m in mods.values())


def test_embedding_similarity_of_descriptions(library, base_dir, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    (lib / "library.json").write_text(json.dumps({
        "fit": {"description": "greetings answered in Chichewa",
                "samples": [r["prompt"] + r["response"] for r in TASK]},
        "other": "Pack my box with five dozen liquor jugs. The quick brown fox jumps over the lazy dog."}))
    model, tok = fresh(base_dir)
    res = select_from_library(model, tok, lib, KSHOT, LibraryConfig(mix="none"))
    emb = {a.name: a.embedding_sim for a in res.adapters}
    assert emb["dup"] is None and emb["noise"] is None
    assert emb["fit"] > emb["other"], emb
    calls = []

    def embedder(texts):  # any callable texts -> (n, d) works, e.g. a MiniLM HFEmbedder
        calls.append(len(texts))
        g = torch.Generator().manual_seed(0)
        return torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=g), dim=-1)

    select_from_library(model, tok, lib, KSHOT, LibraryConfig(mix="none"), embedder=embedder)
    assert calls == [len(KSHOT) + 1 + len(TASK) + 1]
    res = select_from_library(model, tok, lib, KSHOT, LibraryConfig(mix="none", embedder="none"))
    assert all(a.embedding_sim is None for a in res.adapters)
    with pytest.raises(ConfigError, match="not in the library"):
        select_from_library(model, tok, lib, KSHOT, LibraryConfig(mix="none"), descriptions={"zzz": "x"})


def test_the_model_is_left_as_it_was(library, base_dir):
    model, tok = fresh(base_dir)
    lorakit.inject(model, LoraConfig(r=2, target="q_proj"), name="mine")
    randomize(model, "mine", seed=9)
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    before = logits_of(model, ids)
    model.train()
    select_from_library(model, tok, library, KSHOT[:2], LibraryConfig(mix="none"))
    assert model.training and lorakit.adapter_names(model) == ["mine"]
    assert lorakit.core.inject.state(model).active == ["mine"]
    model.eval()
    torch.testing.assert_close(logits_of(model, ids), before, rtol=0, atol=0)


def test_bad_inputs_give_clear_errors(library, base_dir, tmp_path):
    model, tok = fresh(base_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no adapters found in .*empty"):
        select_from_library(model, tok, tmp_path / "empty", KSHOT)
    with pytest.raises(ConfigError, match="need at least one K-shot example"):
        select_from_library(model, tok, library, [])
    with pytest.raises(ConfigError, match=r"response 'hello' is not in the label set"):
        select_from_library(model, tok, library, [{"prompt": "Q:", "response": " hello"}], LibraryConfig(labels=LABELS))
    with pytest.raises(ConfigError, match="top_m=5 but the library holds only 4"):
        select_from_library(model, tok, library, KSHOT, LibraryConfig(top_m=5))
    lorakit.inject(model, LoraConfig(r=2, target="q_proj"), name="library")
    with pytest.raises(AdapterError, match="adapter 'library' already exists"):
        select_from_library(model, tok, library, KSHOT)
    # adapters trained on another base model: lorakit's file (base hash) and PEFT's (shapes)
    bad = tmp_path / "bad"
    shutil.copytree(library, bad)
    small = tiny_llama()  # hidden 32 but vocab 128: another config hash
    lorakit.inject(small, LoraConfig(r=2, target=TARGET), name="x")
    lorakit.save(small, bad / "alien", name="x")
    model, tok = fresh(base_dir)
    with pytest.raises(AdapterFileError, match="library adapter 'alien' .*trained on base model"):
        select_from_library(model, tok, bad, KSHOT)
    shutil.rmtree(bad / "alien")
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=320)).eval()
    lorakit.inject(wide, LoraConfig(r=2, target=TARGET), name="x")
    export_peft(wide, bad / "wide", name="x")
    with pytest.raises(AdapterFileError, match="library adapter 'wide' .*has shape"):
        select_from_library(model, tok, bad, KSHOT)
    res = select_from_library(model, tok, bad, KSHOT, LibraryConfig(on_error="skip", mix="none"))
    assert res.adapters[-1].name == "wide" and "has shape" in res.adapters[-1].error
    assert "skipped" in res.table() and "wide" not in res.chosen
    assert lorakit.adapter_names(model) == []  # nothing half-loaded


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"top_m": 0}, "top_m must be a positive integer"),
        ({"top_m": 3, "candidates": 2}, "candidates=2 is smaller than top_m=3"),
        ({"diversity": -1}, "diversity must be a finite number >= 0"),
        ({"labels": ["a"]}, "labels must be a list of at least two"),
        ({"labels": ["a", "a "]}, "labels must be distinct"),
        ({"mix": "soup"}, "mix must be one of"),
        ({"merge_weights": "x"}, "merge_weights must be"),
        ({"on_error": "ignore"}, "on_error must be"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LibraryConfig(**kw)


def test_solvers_rank_above_blind_guessers():
    # same K-shot accuracy; the guesser's responses are no likelier than the base model's
    score = combine_scores(gain=[1.5, -0.2, 0.4], accuracy=[1.0, 1.0, 0.25])
    assert score[0] > score[1] > score[2]
    # embedding similarity only where an adapter has text; the others sit at the mean (0)
    score = combine_scores(gain=[0.0, 0.0, 0.0], embedding=[0.9, None, 0.1])
    assert score[0] > score[1] == 0.0 > score[2]


def test_choose_group_trades_score_for_diversity():
    scores = [1.0, 0.95, 0.3, 0.0]
    sim = torch.eye(4, dtype=torch.float64)
    sim[0, 1] = sim[1, 0] = 0.99  # 0 and 1 are near-duplicates
    assert choose_group(scores, sim, 2, diversity=0.0)[0] == [0, 1]
    assert choose_group(scores, sim, 2, diversity=1.0)[0] == [0, 2]
    assert choose_group(scores, sim, 2, diversity=1.0, candidates=2)[0] == [0, 1]  # only the top 2 considered
    greedy, _ = choose_group(scores, sim, 3, diversity=1.0, max_combinations=1)
    assert greedy == choose_group(scores, sim, 3, diversity=1.0)[0] == [0, 2, 3]


def test_delta_similarity_is_the_cosine_of_delta_w_for_any_factorisation():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    a2 = torch.cat([a1, torch.randn(2, 10, generator=g, dtype=torch.float64)])  # another rank, correlated
    b2 = torch.cat([b1 + torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g,
                                                                                         dtype=torch.float64)], 1)
    d1, d2 = b1 @ a1, b2 @ a2
    cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
    assert 0.2 < abs(cos) < 0.9
    assert math.isclose(delta_similarity({"m": (a1, b1)}, {"m": (a2, b2)}), abs(cos), rel_tol=1e-9)
    r = torch.randn(3, 3, generator=g, dtype=torch.float64)  # B A = (B R)(R⁻¹ A): the same ΔW, other factors
    same = delta_similarity({"m": (a1, b1)}, {"m": (torch.linalg.solve(r, a1), b1 @ r)})
    assert math.isclose(same, 1.0, rel_tol=1e-9)
    assert math.isclose(delta_similarity({"m": (a1, b1)}, {"m": (a1, -b1)}), 1.0, rel_tol=1e-9)  # |cos|
    # a module only one adapter has counts as 0 in the mean over the union
    assert math.isclose(delta_similarity({"m": (a1, b1), "n": (a1, b1)}, {"m": (a1, b1)}), 0.5, rel_tol=1e-9)


def test_run_library_writes_the_mixture_and_the_selection(library, base_dir, tmp_path):
    kshot = tmp_path / "kshot.jsonl"
    kshot.write_text("".join(json.dumps(r) + "\n" for r in KSHOT))
    cfg = LibraryRunConfig(library=str(library), kshot=str(kshot), output=str(tmp_path / "out"), top_m=2,
                           labels=LABELS)  # the base model comes from the first adapter's record
    res = run_library(cfg)
    sel = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert sel["chosen"] == res.chosen and sel["chosen"][0] == "fit"
    model, _ = fresh(base_dir)
    lorakit.load(model, tmp_path / "out" / "adapter")
    assert lorakit.adapter_names(model) == ["default"]
    with pytest.raises(ConfigError, match="kshot must name a .jsonl file"):
        LibraryRunConfig(library=str(library), kshot=str(tmp_path / "missing.jsonl"))
