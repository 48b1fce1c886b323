"""lorakit.optim.lean_activations: same training math, fewer bytes kept for backward."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import lorakit
import lorakit.optim.lean as lean_mod
from lorakit.optim import lean_activations
from tests.conftest import tiny_llama


def _adapted(seed=0, dropout=0.0):
    model = tiny_llama(seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1  # a non-zero update
    return model.train()


def _step(model, x):
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


X = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))


def test_report_and_same_loss_and_grads():
    plain = _adapted()
    lean = copy.deepcopy(plain)
    report = lean_activations(lean)
    assert report == {"mlp": 2, "norm": 5, "layers": 2, "skipped": []}
    assert lean.training and all(m.training for m in lean.modules())  # the probes' eval() is undone
    want_loss, want = _step(plain, X)
    got_loss, got = _step(lean, X)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert want.keys() == got.keys() and len(got) == 2 * 7 * 2  # A and B of 7 linears x 2 layers
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def _count_saves(model, x):
    """(bytes kept, number of rebuilt saves) for one forward, seen by lean's own pack hook."""
    kept, rebuilt = {}, []
    real = lean_mod._pack

    def spy(t):
        out = real(t)
        if isinstance(out, lean_mod._Rebuild):
            rebuilt.append(tuple(t.shape))
        else:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out

    lean_mod._pack = spy
    try:
        loss = model(input_ids=x, labels=x).loss
    finally:
        lean_mod._pack = real
    loss.backward()
    return sum(kept.values()), rebuilt


def test_adapters_inputs_are_rebuilt_not_kept(monkeypatch):
    model = _adapted()
    lean_activations(model)
    calls = []
    real_register = lean_mod._register

    def counting(out, rebuild):
        real_register(out, lambda: (calls.append(1), rebuild())[1])

    monkeypatch.setattr(lean_mod, "_register", counting)
    kept, rebuilt = _count_saves(model, X)
    assert len(calls) == 2 * 3  # each output rebuilt once in backward, shared by the ops that saved it
    monkeypatch.undo()
    # per layer: the input norm's output (saved by q, k, v's LoRA A), the post-attention norm's
    # output (gate, up) and the gated product (down); the first layer's input norm gets no
    # gradient (frozen embeddings) but its output is still rebuilt rather than kept
    assert len(rebuilt) == 2 * (3 + 2 + 1)
    assert kept > 0
    # with adapter dropout the adapters save their own dropped copy: nothing to rebuild
    model = _adapted(dropout=0.1)
    lean_activations(model)
    assert _count_saves(model, X)[1] == []


def test_gradient_checkpointing_takes_precedence_and_matches():
    plain = _adapted()
    lean = copy.deepcopy(plain)
    lean_activations(lean)
    for m in (plain, lean):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, rebuilt = _count_saves(lean, X)
    assert rebuilt == []  # checkpoint's own hooks are active: lean layers step aside
    want_loss, want = _step(plain, X)
    got_loss, got = _step(lean, X)
    torch.testing.assert_close(got_loss, want_loss)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_forward_without_backward_frees_its_graph():
    model = _adapted()
    lean_activations(model)
    refs = []
    mlp = model.model.layers[0].mlp  # gate and up outputs: kept for the gated product's backward
    for m in (mlp.gate_proj, mlp.up_proj):
        m.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o.untyped_storage())))
    out = model(input_ids=X).logits
    assert out.requires_grad and all(r() is not None for r in refs)
    del out
    gc.collect()
    assert all(r() is None for r in refs)  # no reference cycle through saved-tensor hooks


def test_disable_deepcopy_and_bf16():
    model = _adapted()
    lean_activations(model)
    clone = copy.deepcopy(model)
    mlp = clone.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp  # bound to the copy, not the original
    assert lean_activations(model, enable=False) == {"mlp": 0, "norm": 0, "layers": 0, "skipped": []}
    assert not any("forward" in m.__dict__ for m in model.modules())
    # bf16 base with fp32 adapters under autocast: the QLoRA set-up
    base = _adapted()
    base.to(torch.bfloat16)
    for p in base.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    lean = copy.deepcopy(base)
    lean_activations(lean)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _step(base, X)
        got_loss, got = _step(lean, X)
    torch.testing.assert_close(got_loss, want_loss, atol=2e-2, rtol=2e-2)
    for n in want:
        assert got[n].dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got[n].flatten(), want[n].flatten(), dim=0) > 0.99, n


class _ScaledMLP(nn.Module):
    """Looks like a gated MLP but its forward does something else: must be left alone."""

    def __init__(self, d=8, act=None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 16), nn.Linear(d, 16), nn.Linear(16, d)
        self.act_fn = act or nn.SiLU()

    def forward(self, x):
        return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_look_alikes_are_skipped_and_reported():
    model = nn.Sequential(_ScaledMLP(), _ScaledMLP(act=nn.ReLU()))
    report = lean_activations(model)
    assert report["mlp"] == 0 and report["skipped"] == ["0", "1"]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_gemma_norm_offset_and_geglu():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                                        max_position_embeddings=64, sliding_window=16)
    torch.manual_seed(0)
    plain = transformers.Gemma3ForCausalLM(cfg)
    for n, p in plain.named_parameters():
        if "norm" in n:
            p.data.uniform_(-0.5, 0.5)
    lorakit.inject(plain, lorakit.LoraConfig(r=4, target="all-linear"))
    plain.train()
    lean = copy.deepcopy(plain)
    report = lean_activations(lean)
    assert report["mlp"] == 2 and report["norm"] == 13 and not report["skipped"]
    assert lean.model.layers[0].input_layernorm._lorakit_lean == 1.0  # (1 + w) * x̂
    assert lean.model.layers[0].mlp._lorakit_lean == "gelu_tanh"
    want_loss, want = _step(plain, X)
    got_loss, got = _step(lean, X)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_lora_under_autocast_saves_its_input_not_a_cast_copy():
    model = _adapted()
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big)  # no fp32 up-cast, no bf16 re-cast


class _GatedMLP(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 16), nn.Linear(d, 16), nn.Linear(16, d)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _InPlaceLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _GatedMLP()

    def forward(self, x):
        z = self.mlp(x).exp()  # exp saves its output ...
        return z.add_(1)  # ... which is then modified in place


def test_in_place_change_of_a_saved_tensor_still_raises():
    layer = _InPlaceLayer()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="inplace"):  # autograd's own check
        layer(x).sum().backward()
    assert lean_activations(layer)["layers"] == 1
    with pytest.raises(RuntimeError, match="modified in place"):  # ours: autograd skips hooked tensors
        layer(x).sum().backward()
