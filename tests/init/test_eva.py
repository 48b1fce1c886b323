"""EVA (arXiv:2410.07170): incremental PCA, rank redistribution by explained variance (budget
r·n_layers, at most ρ·r per layer), output == base at init, A = top input components, ranks
stored in the config so save -> load rebuilds the shapes."""

import json

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers, state
from lorakit.errors import ConfigError
from lorakit.init.eva import EvaConfig, IncrementalPCA, distribute_ranks, init_eva
from tests.conftest import logits_of, tiny_bert, tiny_gpt2, tiny_llama
from tests.init.test_lora_ga import lm_batches


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model).items() if name in layer.adapters}


def exact_pca(x):
    xc = x.double() - x.double().mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    return s, vh, s.square() / xc.square().sum()


@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_incremental_pca_matches_pca_of_all_data(method):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, generator=g))[0]
    scales = torch.tensor([8.0, 5.0, 3.0, 2.0] + [0.1] * 36)
    chunks = [(torch.randn(60, 40, generator=g) * scales) @ basis + 3.0 for _ in range(4)]
    ipca = IncrementalPCA(40 if method == "full" else 3, method=method, niter=6)  # lowrank: q=6 < 40/3
    for c in chunks:
        assert ipca.partial_fit(c)
    _, vh, ratio = exact_pca(torch.cat(chunks))
    k = ipca.k
    cos = (ipca.components.double() * vh[:k]).sum(1).abs()
    # all 12 components: exact; the top 3 only: truncating each step costs a little accuracy
    assert (cos > (0.9999 if method == "full" else 0.995)).all(), cos
    tol = 1e-5 if method == "full" else 2e-3
    torch.testing.assert_close(ipca.explained_variance_ratio.double(), ratio[:k], rtol=tol, atol=tol)
    assert (ipca.components.abs().argmax(1) == ipca.components.argmax(1)).all()  # sign convention
    assert not IncrementalPCA(41).partial_fit(torch.randn(80, 41)[:40])  # fewer rows than components: skipped


def test_distribute_ranks_takes_the_largest_ratios_within_the_budget():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1]), "b": torch.tensor([0.4, 0.05, 0.01]), "c": torch.tensor([0.02, 0.01])}
    assert distribute_ranks(ratios, 4) == {"a": 3, "b": 1, "c": 0}
    assert distribute_ranks(ratios, 2) == {"a": 1, "b": 1, "c": 0}
    assert distribute_ranks(ratios, 100) == {"a": 3, "b": 3, "c": 2}  # capped by what each layer offers


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_output_equals_base_and_ranks_sum_to_the_budget(factory):
    model = factory()
    ids = torch.arange(1, 12)[None]
    ref = logits_of(model, ids)
    lorakit.inject(model, EvaConfig(r=4, tau=0.9))
    n_layers = len(adapters(model))
    init_eva(model, lm_batches(4))
    ranks = state(model).configs["default"].ranks
    assert sorted(ranks) == sorted(adapters(model))
    assert sum(ranks.values()) == 4 * n_layers  # the budget of uniform rank r
    assert all(0 <= r <= 8 for r in ranks.values())  # ρ = 2
    assert len(set(ranks.values())) > 1  # really redistributed
    for path, a in adapters(model).items():
        assert a.r == ranks[path] and a.lora_A.weight.shape[0] == ranks[path]
        assert torch.count_nonzero(a.lora_B.weight) == 0
    assert torch.equal(logits_of(model, ids), ref)
    assert lorakit.trainable_parameters(model)[0] == sum(
        r * (a.spec.in_features + a.spec.out_features) for r, a in zip(
            (ranks[p] for p in adapters(model)), adapters(model).values()))


def test_a_holds_the_top_principal_components_of_the_layer_inputs():
    batches = lm_batches(3)
    model = tiny_llama()
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    h.remove()
    _, vh, _ = exact_pca(torch.cat(seen))
    lorakit.inject(model, EvaConfig(r=3, target="down_proj", svd="full", tau=0.999, max_iters=30))
    init_eva(model, batches)
    a = adapters(model)["model.layers.1.mlp.down_proj"].lora_A.weight
    assert a.shape[0] >= 1
    cos = (a.double() * vh[: a.shape[0]]).sum(1).abs()
    assert (cos > 0.95).all(), cos


def test_whiten_scales_rows_by_inverse_root_singular_values():
    model = tiny_llama()
    lorakit.inject(model, EvaConfig(r=2, rho=1.0, target="o_proj", whiten=True, svd="full"))
    init_eva(model, lm_batches(2))
    for a in adapters(model).values():
        norms = a.lora_A.weight.norm(dim=1)
        assert (norms > 0).all() and not torch.allclose(norms, torch.ones_like(norms))


def test_layers_with_the_same_input_share_components():
    model = tiny_llama()
    lorakit.inject(model, EvaConfig(r=4, rho=1.0, target=["q_proj", "k_proj", "v_proj"]))
    init_eva(model, lm_batches(2))
    ads = adapters(model)
    q = ads["model.layers.0.self_attn.q_proj"].lora_A.weight
    v = ads["model.layers.0.self_attn.v_proj"].lora_A.weight
    assert q.shape == v.shape == (4, 32)  # rho = 1: no redistribution
    assert torch.equal(q, v)


def test_save_load_rebuilds_the_redistributed_shapes(tmp_path):
    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    lorakit.inject(model, EvaConfig(r=4, tau=0.9))
    init_eva(model, lm_batches(3))
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.weight.normal_(0, 0.05)
    out = logits_of(model, ids)
    lorakit.save(model, tmp_path / "eva")
    saved = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert saved["lorakit"]["config"]["ranks"] == state(model).configs["default"].ranks
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "eva")
    torch.testing.assert_close(logits_of(fresh, ids), out, rtol=0, atol=1e-6)


def test_rank_zero_layers_work_end_to_end(tmp_path):
    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    ranks = {"model.layers.0.self_attn.q_proj": 0, "model.layers.1.self_attn.q_proj": 6}
    lorakit.inject(model, EvaConfig(r=3, target="q_proj", ranks=ranks))
    ads = adapters(model)
    assert ads["model.layers.0.self_attn.q_proj"].lora_A.weight.shape == (0, 32)
    with torch.no_grad():
        ads["model.layers.1.self_attn.q_proj"].lora_B.weight.normal_(0, 0.1)
    model.train()
    model(input_ids=ids).logits.pow(2).mean().backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).step()
    model.eval()
    out = logits_of(model, ids)
    lorakit.save(model, tmp_path / "z")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "z")
    torch.testing.assert_close(logits_of(fresh, ids), out, rtol=0, atol=1e-6)
    assert ads["model.layers.1.self_attn.q_proj"].to_lora()[0].shape == (6, 32)


def test_peft_export_with_a_rank_zero_layer_loads_in_peft(tmp_path):
    from peft import PeftModel

    from lorakit.core.io import export_peft

    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    lorakit.inject(model, EvaConfig(r=3, target="q_proj", ranks={"model.layers.0.self_attn.q_proj": 0,
                                                                  "model.layers.1.self_attn.q_proj": 5}))
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.weight.normal_(0, 0.1)
    out = logits_of(model, ids)
    export_peft(model, tmp_path / "peft")
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits_of(pm, ids), out, rtol=0, atol=1e-5)


def test_label_mask_and_padding_drop_positions():
    model = tiny_bert()  # encoder with attention_mask; labels are (batch,) for seq-cls: ignored
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 128, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 0])}
               for _ in range(2)]
    batches[0]["attention_mask"][:, 8:] = 0
    lorakit.inject(model, EvaConfig(r=2, target="query"))
    init_eva(model, batches)
    assert sum(state(model).configs["default"].ranks.values()) == 2 * 2


def test_errors():
    model = tiny_llama()
    lorakit.inject(model, EvaConfig(r=16, target="q_proj"))  # ρ·r = 32 components need ≥ 32 tokens
    with pytest.raises(ConfigError, match="at least 32 tokens"):
        init_eva(model, [{"input_ids": torch.ones(1, 8, dtype=torch.long)}])
    with pytest.raises(ConfigError, match="not an EVA adapter"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target="v_proj"), name="plain")
        init_eva(model, lm_batches(1), name="plain")


@pytest.mark.parametrize("kw,msg", [
    ({"r": 0}, "r must be a positive integer"),
    ({"rho": 0.5}, "rho must be a finite number >= 1"),
    ({"tau": 1.5}, "tau must be in"),
    ({"max_iters": 0}, "max_iters must be a positive integer"),
    ({"ranks": {"a": -1}}, r"ranks\['a'\] must be a non-negative integer"),
    ({"ranks": [1, 2]}, "ranks must be a mapping"),
    ({"svd": "x"}, "svd must be 'full' or 'lowrank'"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EvaConfig(**kw)
