"""merge_adapters on a model (exactness, ranks, targets, other methods), parity with PEFT's
add_weighted_adapter, and YAML recipes that write PEFT adapters / merged models."""

import itertools

import pytest
import torch
import yaml

import lorakit
from lorakit.compose import MergeRecipe, load_recipe, merge_adapters, merged_factors, run_recipe
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.methods.dylora import DyLoraConfig
from tests.conftest import logits_of, randomize, tiny_llama

peft = pytest.importorskip("peft")

SOURCES = {  # different ranks and targets; "c" is not even LoRA
    "a": lambda: lorakit.LoraConfig(r=2, alpha=4, target=["q_proj", "v_proj"]),
    "b": lambda: lorakit.LoraConfig(r=4, alpha=8, target="all-linear"),
    "c": lambda: DyLoraConfig(r=3, alpha=6, target=["q_proj", "down_proj"]),
}


def model_with(names=("a", "b", "c")):
    m = tiny_llama()
    for i, n in enumerate(names):
        lorakit.inject(m, SOURCES[n](), name=n)
        randomize(m, n, seed=10 + i)
    return m


def source_delta(model, names, weights):
    """{path: Σ w_i ΔW_i} from each source's own delta_weight() (independent of to_lora)."""
    out = {}
    for path, layer in adapted_layers(model).items():
        for n, w in zip(names, weights):
            if n in layer.adapters:
                out[path] = out.get(path, 0) + w * layer.adapters[n].delta_weight()
    return out


def merged_delta(model, name="merged"):
    return {p: layer.adapters[name].delta_weight() for p, layer in adapted_layers(model).items()
            if name in layer.adapters}


# -- exactness on a model ----------------------------------------------------------------
def test_cat_merge_equals_all_sources_active(tokens):
    m = model_with()
    lorakit.activate(m, ["a", "b", "c"])
    ref = logits_of(m, tokens)
    assert merge_adapters(m, ["a", "b", "c"]) == "merged"
    assert lorakit.adapter_names(m)[-1] == "merged" and m.lorakit.active == ["merged"]
    torch.testing.assert_close(logits_of(m, tokens), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(tiny_llama(), tokens), ref)  # the adapters do something
    ranks = {p.split(".", 3)[-1]: layer.adapters["merged"].r for p, layer in adapted_layers(m).items()
             if p.startswith("model.layers.0.")}
    # rank Σ r_i over the adapters present at each module: q 2+4+3, v 2+4, down 4+3, k 4
    assert ranks["self_attn.q_proj"] == 9 and ranks["self_attn.v_proj"] == 6
    assert ranks["mlp.down_proj"] == 7 and ranks["self_attn.k_proj"] == 4
    merged = [p for layer in adapted_layers(m).values() for p in layer.adapters["merged"].parameters()]
    assert merged and not any(p.requires_grad for p in merged)  # frozen by default, like lorakit.load


@pytest.mark.parametrize("method", ["cat", "task_arithmetic", "linear"])
def test_weighted_exact_methods(method):
    m = model_with()
    w = [0.5, -1.0, 2.0]
    merge_adapters(m, ["a", "b", "c"], w, method=method)
    scale = 1 / sum(w) if method == "linear" else 1.0  # linear normalises over ALL adapters
    ref = source_delta(m, ["a", "b", "c"], [x * scale for x in w])
    got = merged_delta(m)
    assert set(got) == set(ref)
    for p in ref:
        torch.testing.assert_close(got[p], ref[p], rtol=0, atol=1e-5)


def test_svd_merge_error_decreases_with_rank():
    m = model_with()
    names, w = ["a", "b", "c"], [1.0, 0.5, 0.7]
    ref = source_delta(m, names, w)
    errors = []
    for k in range(1, 10):
        f = merged_factors(m, names, w, method="svd", rank=k)
        errors.append(sum(torch.linalg.norm(b @ a - ref[p]).item() ** 2 for p, (a, b) in f.items()) ** 0.5)
    assert all(e2 <= e1 + 1e-6 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[0] > errors[4] > 1e-2 and errors[-1] < 1e-4  # rank 9 = max Σ r_i: exact


def test_cat_on_gpt2_conv1d_and_embedding(tmp_path, tokens):
    from tests.conftest import tiny_gpt2

    m = tiny_gpt2()
    lorakit.inject(m, lorakit.LoraConfig(r=2, target=["c_attn", "wte"]), name="x")
    lorakit.inject(m, lorakit.LoraConfig(r=3, target=["c_attn", "c_fc"]), name="y")
    randomize(m, "x", 1)
    randomize(m, "y", 2)
    ref = logits_of(m, tokens)
    merge_adapters(m, ["x", "y"])
    torch.testing.assert_close(logits_of(m, tokens), ref, rtol=0, atol=1e-5)
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), str(lorakit.save(m, tmp_path / "m", name="merged")))
    torch.testing.assert_close(logits_of(pm.eval(), tokens), ref, rtol=0, atol=1e-5)


def test_modules_to_save_carry_over_but_cannot_collide():
    from tests.conftest import tiny_bert

    m = tiny_bert()
    lorakit.inject(m, lorakit.LoraConfig(r=2, target=["query"], modules_to_save=["classifier"]), name="x")
    lorakit.inject(m, lorakit.LoraConfig(r=2, target=["value"]), name="y")
    merge_adapters(m, ["x", "y"])
    assert m.lorakit.configs["merged"].modules_to_save == ["classifier"]
    lorakit.inject(m, lorakit.LoraConfig(r=2, target=["value"], modules_to_save=["classifier"]), name="z")
    with pytest.raises(ConfigError, match="both train module 'classifier'"):
        merge_adapters(m, ["x", "z"], out_name="xz")
    assert "xz" not in lorakit.adapter_names(m)


def test_merge_from_paths_leaves_only_the_result(tmp_path, tokens):
    src = model_with(("a", "b"))
    lorakit.save(src, tmp_path / "a", name="a")
    lorakit.save(src, tmp_path / "b", name="b")
    lorakit.activate(src, ["a", "b"])
    ref = logits_of(src, tokens)
    m = tiny_llama()
    merge_adapters(m, [tmp_path / "a", str(tmp_path / "b")], out_name="ab")
    assert lorakit.adapter_names(m) == ["ab"]  # the sources were loaded for the merge only
    torch.testing.assert_close(logits_of(m, tokens), ref, rtol=0, atol=1e-5)


def test_sparse_methods_run_on_a_model_and_respect_rank():
    m = model_with()
    for i, (method, density) in enumerate([("ties", 0.3), ("dare_linear", 0.5), ("dare_ties", 0.5),
                                           ("magnitude_prune", 0.2)]):
        merge_adapters(m, ["a", "b", "c"], [1.0, 1.0, 1.0], method=method, rank=2, density=density,
                       out_name=f"m{i}", activate=False)
        assert {layer.adapters[f"m{i}"].r for layer in adapted_layers(m).values()} == {2}


# -- parity with PEFT's add_weighted_adapter ----------------------------------------------
def peft_pair(tmp_path, names=("a", "b", "c")):
    """The same sources in a lorakit model and a PeftModel (loaded from lorakit's files)."""
    m = model_with(names)
    pm = None
    for n in names:
        if SOURCES[n]().method != "lora":  # PEFT has no DyLoRA: export it as the exact LoRA
            from lorakit.core.io import export_peft

            path = export_peft(m, tmp_path / n, name=n)
        else:
            path = lorakit.save(m, tmp_path / n, name=n)
        if pm is None:
            pm = peft.PeftModel.from_pretrained(tiny_llama(), str(path), adapter_name=n)
        else:
            pm.load_adapter(str(path), adapter_name=n)
    return m, pm


def peft_deltas(pm, name):
    from peft.tuners.lora import LoraLayer

    return {p: mod.get_delta_weight(name) for p, mod in pm.base_model.model.named_modules()
            if isinstance(mod, LoraLayer) and name in mod.lora_A}


@pytest.mark.parametrize("ours,theirs,kw", [
    ("cat", "cat", {}),
    ("svd", "svd", {"rank": 3}),
    ("ties", "ties_svd", {"rank": 4, "density": 0.3}),
    ("ties", "ties_svd", {"rank": 4, "density": 0.5, "majority_sign": "frequency"}),
    ("magnitude_prune", "magnitude_prune_svd", {"rank": 5, "density": 0.4}),
    ("dare_linear", "dare_linear_svd", {"rank": 4, "density": 0.5}),
    ("dare_ties", "dare_ties_svd", {"rank": 4, "density": 0.6}),
])
def test_matches_peft_add_weighted_adapter(tmp_path, monkeypatch, ours, theirs, kw):
    from peft.tuners.lora.model import LoraModel

    m, pm = peft_pair(tmp_path)
    weights, seed = [0.8, 1.0, -0.6], 3
    # PEFT draws DARE masks from the global RNG after building the new adapter (whose init
    # also draws from it): seed it right before the first module is merged, as we do.
    original, calls = LoraModel._svd_generalized_task_arithmetic_weighted_adapter, []

    def seeded(self, *args, **kwargs):
        if not calls:
            torch.manual_seed(seed)
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", seeded)
    pm.add_weighted_adapter(["a", "b", "c"], weights, "m", combination_type=theirs, svd_rank=kw.get("rank"),
                            density=kw.get("density"), majority_sign_method=kw.get("majority_sign", "total"))
    merge_adapters(m, ["a", "b", "c"], weights, method=ours, seed=seed, **kw)
    theirs_d, ours_d = peft_deltas(pm, "m"), merged_delta(m)
    assert set(theirs_d) == set(ours_d)
    for p in ours_d:
        torch.testing.assert_close(ours_d[p], theirs_d[p], rtol=0, atol=1e-5)


def test_peft_linear_is_not_the_average_of_updates(tmp_path):
    """PEFT's "linear" averages A and B separately (cross terms B_i A_j); ours is exact."""
    m, pm = peft_pair(tmp_path, names=("a",))
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, target=["q_proj", "v_proj"]), name="a2")
    randomize(m, "a2", seed=99)
    pm.load_adapter(str(lorakit.save(m, tmp_path / "a2", name="a2")), adapter_name="a2")
    pm.add_weighted_adapter(["a", "a2"], [0.5, 0.5], "lin", combination_type="linear")
    merge_adapters(m, ["a", "a2"], [0.5, 0.5], method="linear", out_name="lin")
    ref = source_delta(m, ["a", "a2"], [0.5, 0.5])
    p = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(merged_delta(m, "lin")[p], ref[p], rtol=0, atol=1e-6)
    assert (peft_deltas(pm, "lin")[p] - ref[p]).abs().max() > 1e-3


# -- recipes -----------------------------------------------------------------------------------
@pytest.fixture
def saved_sources(tmp_path, tiny_model_dir):
    from lorakit.models import load_model

    m, _ = load_model(str(tiny_model_dir))
    for i, n in enumerate(("a", "b")):
        lorakit.inject(m, SOURCES[n](), name=n)
        randomize(m, n, seed=20 + i)
        lorakit.save(m, tmp_path / n, name=n)
    return m, [tmp_path / "a", tmp_path / "b"]


def write_recipe(path, **data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_round_trip_peft_format(tmp_path, tiny_model_dir, saved_sources, tokens):
    from transformers import AutoModelForCausalLM

    src, (pa, pb) = saved_sources
    w = [0.7, 1.3]
    recipe = write_recipe(tmp_path / "merge.yaml", base_model=str(tiny_model_dir), method="cat",
                          adapters=[{"path": str(pa), "weight": w[0]}, {"path": str(pb), "weight": w[1]}],
                          output=str(tmp_path / "out"), format="peft")
    out = run_recipe(recipe)
    assert out == tmp_path / "out" and (out / "adapter_model.safetensors").is_file()
    merge_adapters(src, ["a", "b"], w, out_name="check")  # the same merge in memory
    ref = logits_of(src, tokens)
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), str(out)).eval()
    torch.testing.assert_close(logits_of(pm, tokens), ref, rtol=0, atol=1e-5)
    ours = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out)
    torch.testing.assert_close(logits_of(ours, tokens), ref, rtol=0, atol=1e-5)
    # with weight 1 each, cat equals both sources active at once
    lorakit.activate(src, ["a", "b"])
    both = logits_of(src, tokens)
    out1 = run_recipe(MergeRecipe(adapters=[str(pa), str(pb)], output=str(tmp_path / "out1")))
    pm1 = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), str(out1))
    torch.testing.assert_close(logits_of(pm1.eval(), tokens), both, rtol=0, atol=1e-5)


def test_recipe_merged_format_and_ties(tmp_path, tiny_model_dir, saved_sources, tokens):
    from transformers import AutoModelForCausalLM

    src, (pa, pb) = saved_sources
    data = {"adapters": [{"path": str(pa)}, {"path": str(pb), "weight": 0.5}], "method": "ties", "rank": 3,
                "density": 0.5, "output": str(tmp_path / "full"), "format": "merged"}  # base_model from the adapter
    out = run_recipe(data)
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    merge_adapters(src, ["a", "b"], [1.0, 0.5], method="ties", rank=3, density=0.5, out_name="t")
    ref = logits_of(src, tokens)
    full = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(full, tokens), ref, rtol=0, atol=1e-5)
    # the same recipe in PEFT format loads in PEFT with the same logits
    data.update(format="peft", output=str(tmp_path / "ties"))
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                                        str(run_recipe(data))).eval()
    torch.testing.assert_close(logits_of(pm, tokens), ref, rtol=0, atol=1e-5)


def test_load_recipe_reads_yaml(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "r.yaml", adapters=["x", {"path": "y", "weight": 2}], output="o",
                                 method="dare_ties", density=0.3, rank=8, seed=5))
    assert [(e.path, e.weight) for e in r.adapters] == [("x", 1.0), ("y", 2)]
    assert (r.method, r.density, r.rank, r.seed, r.format) == ("dare_ties", 0.3, 8, 5, "peft")


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    ({"adapters": ["x"], "output": "o", "methd": "cat"}, r"unknown MergeRecipe key\(s\) \['methd'\]"),
    ({"adapters": [{"path": "x", "wieght": 1}], "output": "o"}, r"adapters\[0\]: unknown AdapterEntry key"),
    ({"adapters": ["x"], "output": "o", "method": "avg"}, "unknown merge method 'avg'"),
    ({"adapters": ["x"], "output": "o", "format": "gguf"}, "format must be 'peft' or 'merged'"),
    ({"adapters": [], "output": "o"}, "non-empty list"),
    ({"adapters": ["x"]}, "output"),
    ({"adapters": ["x", "y"], "output": "o", "method": "svd", "rank": 0}, "rank must be a positive integer"),
    ({"adapters": ["x"], "output": "o", "method": "ties", "density": 0}, r"density must be in \(0, 1\]"),
])
def test_recipe_errors(tmp_path, data, match):
    path = write_recipe(tmp_path / "bad.yaml", **data)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path)


def test_run_recipe_missing_adapter(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter directory not found"):
        run_recipe(MergeRecipe(adapters=[str(tmp_path / "nope")], output=str(tmp_path / "o")))


@pytest.mark.parametrize("kwargs,err,match", [
    ({"method": "mean"}, ConfigError, "unknown merge method"),
    ({"weights": [1.0]}, ConfigError, "got 1 weights for 2 adapters"),
    ({"method": "svd", "rank": 0}, ConfigError, "rank must be a positive integer"),
    ({"method": "dare_linear", "density": 1.01}, ConfigError, r"density must be in \(0, 1\]"),
    ({"out_name": "a"}, AdapterError, "already exists"),
    ({"out_name": "../x"}, ConfigError, "invalid adapter name"),
])
def test_merge_adapters_errors_leave_the_model_unchanged(kwargs, err, match):
    m = model_with(("a", "b"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(err, match=match):
        merge_adapters(m, ["a", "b"], **kwargs)
    assert lorakit.adapter_names(m) == ["a", "b"]
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_merge_adapters_unknown_source_and_merged_base(tmp_path):
    m = model_with(("a", "b"))
    with pytest.raises(AdapterError, match="neither an adapter on this model"):
        merge_adapters(m, ["a", str(tmp_path / "missing")])
    assert lorakit.adapter_names(m) == ["a", "b"]
    lorakit.merge(m, ["a"])
    with pytest.raises(AdapterError, match="unmerge them first"):
        merge_adapters(m, ["a", "b"])
