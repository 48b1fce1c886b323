"""DyLoRA: nested ranks, per-step rank sampling, any rank at evaluation.

METHODS.md Check: after one training run, evaluation at ranks 1..r is flat-ish compared with
LoRAs trained separately at each rank (test_one_run_serves_every_rank).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.dylora import (
    Dylora,
    DyLoraConfig,
    dylora_modules,
    sample_rank,
    set_rank,
    set_train_rank,
)
from tests.conftest import logits_of, perturb, tiny_llama

# (d_in + d_out) summed over the 7 linear layers of one tiny Llama block (hidden 32, kv 16, mlp 64)
LLAMA_IO_PER_LAYER = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 4, "min_rank": 5}, "min_rank must be <= r=4"),
        ({"min_rank": 0}, "min_rank must be a positive integer"),
        ({"r": 4, "eval_rank": 5}, "eval_rank must be between 1 and r=4"),
        ({"eval_rank": 0}, "eval_rank must be a positive integer"),
        ({"mode": "half"}, r"mode must be one of \('full', 'frozen'\)"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\)"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        DyLoraConfig(**kw)


def test_config_dict_round_trip_and_unknown_key():
    cfg = DyLoraConfig(r=6, min_rank=2, mode="frozen", eval_rank=3)
    assert DyLoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown DyLoraConfig key"):
        DyLoraConfig.from_dict({"rank": 4})


def test_parameter_count_is_r_times_din_plus_dout():
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=4))
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == 4 * 2 * LLAMA_IO_PER_LAYER  # same as LoRA at the largest rank


def test_eval_rank_is_the_nested_truncation_and_to_lora_is_exact(tokens):
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=4, alpha=8))
    perturb(model)
    _path, m = next(iter(dylora_modules(model).items()))
    x = torch.randn(5, m.spec.in_features)
    outs = []
    for k in range(1, 5):
        set_rank(model, k)
        a, b = m.lora_A.weight[:k], m.lora_B.weight[:, :k]
        with torch.no_grad():
            torch.testing.assert_close(m.delta(x, None), (x @ a.T @ b.T) * (8 / k), rtol=1e-6, atol=1e-7)
        la, lb, s = m.to_lora()
        assert la.shape == (k, m.spec.in_features) and lb.shape == (m.spec.out_features, k) and s == 8 / k
        torch.testing.assert_close((lb @ la) * s, m.delta_weight(), rtol=0, atol=0)
        la2, lb2, s2 = m.to_lora(k)  # explicit rank = the same sub-model, whatever eval_rank is
        assert torch.equal(la2, la) and torch.equal(lb2, lb) and s2 == s
        outs.append(logits_of(model, tokens))
    assert all(not torch.allclose(outs[i], outs[i + 1]) for i in range(3))
    assert m.to_lora(99)[0].shape[0] == 4  # clamped to r
    with pytest.raises(ValueError, match="rank must be positive"):
        m.to_lora(0)


def test_set_rank_errors():
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=4))
    for bad in (0, 5, "2", 2.0, True):
        with pytest.raises(ConfigError, match="between 1 and r=4"):
            set_rank(model, bad)
    with pytest.raises(AdapterError, match="no DyLoRA adapter named 'other'"):
        set_rank(model, 2, name="other")
    perturb(model)
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="merged.*unmerge first"):
        set_rank(model, 2)
    lorakit.unmerge(model)
    set_rank(model, 2)
    with pytest.raises(ConfigError, match="train rank"):
        set_train_rank(model, 7)


def test_chosen_rank_survives_save_and_load(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=4))
    perturb(model)
    set_rank(model, 2)
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    assert {m.eval_rank for m in dylora_modules(fresh).values()} == {2}
    assert torch.equal(logits_of(fresh, tokens), out)


def test_merge_uses_the_eval_rank(tokens):
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=4))
    perturb(model, scale=0.2)
    set_rank(model, 1)
    out = logits_of(model, tokens)
    lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_training_forward_uses_sampled_rank_and_mode_sets_which_rows_learn(mode, tokens):
    model = tiny_llama()
    lorakit.inject(model, DyLoraConfig(r=5, mode=mode))
    perturb(model)
    model.train()
    set_train_rank(model, 3)
    model(input_ids=tokens).logits.pow(2).mean().backward()
    expect = [0, 1, 2] if mode == "full" else [2]  # frozen: only row/column b (index b-1)
    for m in dylora_modules(model).values():
        rows_a = (m.lora_A.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        cols_b = (m.lora_B.weight.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
        assert rows_a == expect and cols_b == expect
    # train mode without a sampled rank (outside train()) uses all r ranks ...
    set_train_rank(model, None)
    set_rank(model, 2)
    assert {m.rank() for m in dylora_modules(model).values()} == {5}
    with torch.no_grad():  # ... but inference serves eval_rank, whatever the module mode
        assert {m.rank() for m in dylora_modules(model).values()} == {2}
    model.eval()
    assert {m.rank() for m in dylora_modules(model).values()} == {2}


def test_rank_sampler_callback_is_seeded_shared_and_reset():
    model = tiny_llama()
    cfg = DyLoraConfig(r=6, min_rank=2, target=["q_proj", "v_proj"])
    lorakit.inject(model, cfg)
    (cb,) = Dylora.trainer_callbacks(model, "default", cfg)
    mods = list(dylora_modules(model).values())

    def draws(seed):
        seq = []
        for step in range(60):
            cb.on_step_begin(SimpleNamespace(seed=seed), SimpleNamespace(global_step=step), None)
            assert len({m.train_rank for m in mods}) == 1  # the same b for every layer
            seq.append(mods[0].train_rank)
        return seq

    a, b = draws(0), draws(0)
    assert a == b and set(a) == {2, 3, 4, 5, 6}  # reproducible; covers min_rank..r
    assert draws(1) != a
    assert a == [sample_rank(0, s, 2, 6) for s in range(60)]
    cb.on_train_end(None, None, None)
    assert all(m.train_rank is None for m in mods)


# -- METHODS.md Check: one DyLoRA run serves every rank ---------------------------------------
class _Proj(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.proj = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w0)

    def forward(self, x):
        return self.proj(x)


def _task(d=16, n=256):
    """y = (W0 + U diag(s) Vᵀ) x, spectrum halving each rank: the best rank-b fit is the top-b part."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.tensor([2.0, 1.0, 0.5, 0.25, 0.125, 0.0625])
    w0 = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g)
    y = x @ (w0 + (u[:, :6] * s) @ v[:, :6].T).T
    return w0, x, y


def _fit(cfg, w0, x, y, steps, dylora_seed=None):
    """Full-batch Adam with cosine decay; DyLoRA draws b per step as the Trainer callback does."""
    torch.manual_seed(1)
    model = _Proj(w0)
    lorakit.inject(model, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    model.train()
    for step in range(steps):
        if dylora_seed is not None:
            set_train_rank(model, sample_rank(dylora_seed, step, 1, cfg.r))
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _mse(model, x, y):
    with torch.no_grad():
        return float((model(x) - y).pow(2).mean())


def test_one_run_serves_every_rank():
    """Losses relative to the untrained model (numbers from this setup, CPU):
        rank        1     2     3     4     5     6
        DyLoRA    .27   .19   .08   .06   .04   .02    one run, served at each rank
        LoRA@b    .24   .06   .01   .00   .00   .00    six runs, one per rank
        LoRA-6 cut .75  .53   .32   .13   .05   .00    one rank-6 LoRA cut to its first b ranks
    DyLoRA's α/b scale makes the nested fit a compromise (rank-b optimum ≠ truncation of the
    rank-(b+1) optimum), so it is flat-ish, not equal, to per-rank LoRAs.
    """
    r = 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16x16 matmuls: threads only add overhead
    try:
        _check_flat(r)
    finally:
        torch.set_num_threads(threads)


def _check_flat(r):
    w0, x, y = _task()
    untrained = float((x @ w0.T - y).pow(2).mean())
    dy = _fit(DyLoraConfig(r=r, alpha=r, target="proj"), w0, x, y, steps=600, dylora_seed=0)
    dy_loss = []
    for b in range(1, r + 1):
        set_rank(dy, b)
        dy_loss.append(_mse(dy, x, y) / untrained)
    lora_loss = [_mse(_fit(lorakit.LoraConfig(r=b, alpha=b, target="proj"), w0, x, y, steps=300), x, y) / untrained
                 for b in range(1, r + 1)]
    m = _fit(lorakit.LoraConfig(r=r, alpha=r, target="proj"), w0, x, y, steps=300).proj.adapters["default"]
    cut = []
    for b in range(1, r + 1):
        a_, b_ = m.lora_A.weight[:b], m.lora_B.weight[:, :b]
        with torch.no_grad():
            cut.append(float((x @ w0.T + (x @ a_.T @ b_.T) * m.scale - y).pow(2).mean()) / untrained)
    table = "\n".join(f"rank {b + 1}: dylora {dy_loss[b]:.4f}  lora@b {lora_loss[b]:.4f}  cut {cut[b]:.4f}"
                      for b in range(r))
    assert all(v < 0.35 for v in dy_loss), table  # every rank far better than untrained
    assert all(dy_loss[i + 1] <= dy_loss[i] * 1.05 for i in range(r - 1)), table  # monotone in b
    assert all(d <= lo + 0.2 for d, lo in zip(dy_loss, lora_loss)), table  # near a LoRA trained at b
    gap_dy = max(d - lo for d, lo in zip(dy_loss, lora_loss))
    gap_cut = max(c - lo for c, lo in zip(cut, lora_loss))
    assert gap_dy < 0.5 * gap_cut, table  # flat-ish: far smaller worst gap than a cut LoRA
    assert dy_loss[0] < 0.5 * cut[0] and dy_loss[1] < 0.5 * cut[1], table


def test_train_samples_one_seeded_rank_per_step(tiny_model_dir, text_file, tmp_path):
    from transformers import TrainerCallback

    from lorakit.train import TrainConfig, train

    seen = []

    class Record(TrainerCallback):  # runs after the method's callbacks
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append({m.train_rank for m in dylora_modules(model).values()})

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="dylora", block_size=16, batch_size=2, grad_accum=2, max_steps=4, lr=1e-2,
                      warmup_steps=0, save_steps=4, logging_steps=1, progress=False, seed=3)
    res = train(cfg, adapter={"r": 4}, callbacks=[Record()])
    assert seen == [{sample_rank(3, step, 1, 4)} for step in range(4)]  # once per optimizer step
    assert all(m.train_rank is None for m in dylora_modules(res.model).values())
    fresh = lorakit.load(tiny_llama_from(tiny_model_dir), res.adapter_dir)
    assert {m.eval_rank for m in dylora_modules(fresh).values()} == {4}


def tiny_llama_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()
