"""AdapterPool: on-demand loading, byte budget + LRU + pinning, safe names, clear errors,
background prefetch that never blocks other adapters."""

import math
import threading
import time

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, LorakitError
from lorakit.serve import AdapterPool
from tests.conftest import tiny_llama


def make_adapter(root, name, seed=0, target="all-linear", **cfg):
    """Save a randomised tiny-Llama LoRA as root/name; returns {module path: (A, B·s)}."""
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(target=target, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(m).values():
            for p in layer.adapters["default"].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lorakit.save(m, root / name)
    out = {}
    for path, layer in adapted_layers(m).items():
        a, b, s = layer.adapters["default"].to_lora()
        out[path] = (a, b * s)
    return out


def nbytes(factors):
    return sum(a.numel() * 4 + b.numel() * 4 for a, b in factors.values())


@pytest.fixture
def adapters(tmp_path):
    facs = {n: make_adapter(tmp_path, n, seed=i, r=4, alpha=8) for i, n in enumerate(["a", "b", "c"])}
    return tmp_path, facs


def test_lora_factors_fold_the_scale(tmp_path):
    want = make_adapter(tmp_path, "x", r=4, alpha=3.0, rslora=True, rank_pattern={"q_proj": 2})
    pool = AdapterPool(tmp_path)
    got = pool.get("x")
    assert got.method == "lora" and got.rank == 4 and set(got.factors) == set(want)
    for p, (a, b) in want.items():
        torch.testing.assert_close(got.factors[p][0], a, rtol=0, atol=0)
        torch.testing.assert_close(got.factors[p][1], b, rtol=1e-6, atol=1e-7)
    q = "model.layers.0.self_attn.q_proj"
    assert got.factors[q][0].shape == (2, 32)  # rank_pattern respected, scale α/√2
    assert got.nbytes == nbytes(want)


def test_peft_written_adapter_loads(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    got = AdapterPool(tmp_path).get("p")
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    fa, fb = got.factors["model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(fa, a.detach())
    torch.testing.assert_close(fb, b.detach() * 6 / 4)
    assert len(got.factors) == 4  # q and v in 2 layers


def test_budget_lru_and_stats(adapters):
    root, facs = adapters
    size = nbytes(facs["a"])
    pool = AdapterPool(root, budget_bytes=2 * size)
    pool.get("a"), pool.get("b")
    pool.get("a")  # a is now most recently used
    pool.get("c")  # evicts b (LRU)
    st = pool.stats
    assert st.adapters == ("a", "c") and st.bytes == 2 * size <= st.budget_bytes
    assert (st.hits, st.misses, st.evictions) == (1, 3, 1)
    pool.get("b")  # evicts a
    assert pool.stats.adapters == ("c", "b") and pool.stats.bytes <= pool.budget_bytes


def test_pinned_adapters_are_never_evicted(adapters):
    root, facs = adapters
    size = nbytes(facs["a"])
    pool = AdapterPool(root, budget_bytes=2 * size)
    pool.pin("a")
    for name in ["b", "c", "b", "c"]:
        pool.get(name)
        assert "a" in pool and pool.stats.bytes <= pool.budget_bytes
    assert pool.stats.pinned == ("a",)
    pool.pin("c")  # now both slots pinned: a third adapter cannot fit
    with pytest.raises(AdapterError, match="budget"):
        pool.get("b")
    assert set(pool.stats.adapters) == {"a", "c"}
    pool.unpin("a")
    pool.get("b")
    assert set(pool.stats.adapters) == {"b", "c"}


def test_adapter_larger_than_budget_is_refused_cleanly(adapters):
    root, facs = adapters
    pool = AdapterPool(root, budget_bytes=nbytes(facs["a"]) - 1)
    with pytest.raises(AdapterError, match="needs .* bytes"):
        pool.get("a")
    assert pool.stats.bytes == 0 and len(pool) == 0


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "", ".", "..", "a.b", "x/../../etc"])
def test_bad_names_are_rejected(adapters, bad):
    root, _ = adapters
    pool = AdapterPool(root)
    with pytest.raises(LorakitError):
        pool.get(bad)
    with pytest.raises(LorakitError):
        pool.prefetch([bad])


def test_symlink_leaving_the_directory_is_rejected(tmp_path):
    (tmp_path / "pool").mkdir()
    make_adapter(tmp_path, "outside")
    (tmp_path / "pool" / "link").symlink_to(tmp_path / "outside")
    pool = AdapterPool(tmp_path / "pool")
    with pytest.raises(AdapterError, match="outside the adapter directory"):
        pool.get("link")
    assert pool.available() == []


def test_unknown_adapter_names_what_exists(adapters):
    root, _ = adapters
    with pytest.raises(AdapterError, match=r"unknown adapter 'zz'.*\['a', 'b', 'c'\]"):
        AdapterPool(root).get("zz")


def test_corrupt_adapter_gives_clear_error_and_does_not_poison_the_pool(adapters):
    root, facs = adapters
    pool = AdapterPool(root)
    pool.get("a")
    weights = root / "b" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        pool.get("b")
    st = pool.stats
    assert st.adapters == ("a",) and st.bytes == nbytes(facs["a"]) and st.failed_loads == 1
    pool.get("c")  # others still load
    weights.write_bytes(good)  # fixed on disk: loads now (failures are not cached forever)
    assert pool.get("b").rank == 4
    (root / "c" / "adapter_config.json").write_text("{not json")
    pool.evict("c")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        pool.get("c")


def test_nan_and_shape_mismatch_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    make_adapter(tmp_path, "n", r=2)
    f = tmp_path / "n" / "adapter_model.safetensors"
    t = load_file(f)
    k = next(k for k in t if k.endswith("lora_B.weight"))
    t[k][0, 0] = float("nan")
    save_file(t, f)
    with pytest.raises(AdapterFileError, match="NaN"):
        AdapterPool(tmp_path).get("n")
    t[k] = torch.zeros(5, 2)  # wrong d_out for the model
    save_file(t, f)
    pool = AdapterPool(tmp_path, model=tiny_llama())
    with pytest.raises(AdapterFileError, match=r"has A \(2, \d+\) and B \(5, 2\), but the model.s layer maps"):
        pool.get("n")


def test_modules_to_save_is_refused(tmp_path):
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=2, target="q_proj", modules_to_save=["lm_head"]))
    lorakit.save(m, tmp_path / "h")
    with pytest.raises(ConfigError, match="modules_to_save"):
        AdapterPool(tmp_path).get("h")


def test_prefetch_loads_in_the_background(adapters):
    root, _ = adapters
    pool = AdapterPool(root)
    pool.prefetch(["a", "b", "a"])
    deadline = time.time() + 10
    while pool.state("a") != "ready" or pool.state("b") != "ready":
        assert time.time() < deadline
        pool.wait_for_load(0.05)
    assert pool.stats.misses == 2 and pool.state("c") == "absent"
    pool.prefetch(["missing"])
    while pool.state("missing") == "loading":
        pool.wait_for_load(0.05)
    assert pool.state("missing") == "failed"
    assert isinstance(pool.take_error("missing"), AdapterError)
    assert pool.state("missing") == "absent"
    pool.close()


def test_a_slow_load_never_blocks_other_adapters(adapters):
    root, _ = adapters
    pool = AdapterPool(root)
    release, started = threading.Event(), threading.Event()
    read = pool._read

    def slow_read(name, path):
        if name == "a":
            started.set()
            assert release.wait(10)
        return read(name, path)

    pool._read = slow_read
    pool.prefetch(["a"])
    assert started.wait(10)
    t0 = time.time()
    assert pool.get("b").name == "b"  # a's load is stuck, b loads regardless
    assert time.time() - t0 < 5 and pool.state("a") == "loading"
    waiter = threading.Thread(target=pool.get, args=("a",))  # a second get of "a" waits for the first load
    waiter.start()
    release.set()
    waiter.join(10)
    assert pool.state("a") == "ready" and pool.stats.misses == 2  # loaded once
    pool.close()


def test_non_lora_methods_are_converted_with_to_lora(tmp_path):
    from lorakit.methods.loldu import LoLDUConfig

    m = tiny_llama()
    lorakit.inject(m, LoLDUConfig(r=4, target=["q_proj", "down_proj"]))
    with torch.no_grad():
        for layer in adapted_layers(m).values():
            layer.adapters["default"].vector_z.mul_(1.5)
    lorakit.save(m, tmp_path / "ld")
    with pytest.raises(ConfigError, match="needs the base model"):
        AdapterPool(tmp_path).get("ld")
    got = AdapterPool(tmp_path, model=tiny_llama()).get("ld")
    assert got.method == "loldu" and len(got.factors) == 4
    for path, layer in adapted_layers(m).items():
        a, b = got.factors[path]
        torch.testing.assert_close(b @ a, layer.adapters["default"].delta_weight(), rtol=1e-5, atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        AdapterPool(tmp_path / "nope")
    with pytest.raises(ConfigError, match="budget_bytes"):
        AdapterPool(tmp_path, budget_bytes=0)
    with pytest.raises(ConfigError, match="convert_rank"):
        AdapterPool(tmp_path, convert_rank=-1)
    pool = AdapterPool(tmp_path, model=tiny_llama())
    with pytest.raises(ConfigError, match="already bound"):
        pool.bind(tiny_llama())
    assert math.isfinite(pool.budget_bytes)


def test_adapter_for_another_base_is_refused(tmp_path):
    m = tiny_llama()
    m.config.rms_norm_eps = 1e-5  # same shapes, different architecture config
    lorakit.inject(m, lorakit.LoraConfig(r=2))
    lorakit.save(m, tmp_path / "other")
    with pytest.raises(AdapterFileError, match="config hash mismatch"):
        AdapterPool(tmp_path, model=tiny_llama()).get("other")
    assert AdapterPool(tmp_path, model=tiny_llama(), check_base=False).get("other").rank == 2
