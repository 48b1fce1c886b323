"""ALLoRA: per-row gradient scaling 1/√(‖θ_i‖² + 1/η²) of LoRA factors before the inner step."""

import copy
import itertools

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim.allora import ALLoRA, allora_lora_config, allora_scale, factor_params
from tests.conftest import perturb, tiny_llama


def _lora_model(seed=0):
    model = tiny_llama(seed)
    lorakit.inject(model, allora_lora_config(r=4))
    perturb(model)  # non-zero rows so the norms differ
    return model


def _backward(model, ids):
    target = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    loss = (model(input_ids=ids).logits - target).pow(2).mean()
    loss.backward()
    return loss.item()


def test_no_dropout_no_scaling_config():
    cfg = allora_lora_config(r=4)
    assert cfg.alpha / cfg.r == 1.0 and cfg.dropout == 0.0


def test_per_row_scaling_equals_the_formula(tokens):
    model = _lora_model()
    eta = 3.0
    opt = ALLoRA(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), eta=eta, model=model)
    assert len(opt.factors) == 2 * 2 * 7  # lora_A and lora_B of 7 modules x 2 layers
    _backward(model, tokens)
    before = {p: (p.detach().clone(), p.grad.clone()) for p in opt.factors}
    opt.step()
    for p, (w, g) in before.items():
        expected = g / torch.sqrt((w**2).sum(dim=1, keepdim=True) + 1 / eta**2)  # row-wise
        torch.testing.assert_close(p.grad, expected)
        torch.testing.assert_close(p.detach(), w - 0.1 * expected)  # SGD step on the scaled grad
    torch.testing.assert_close(allora_scale(torch.zeros(2, 3), 5.0), torch.full((2, 1), 5.0))  # zero row: η


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_small_eta_limit_is_the_plain_optimizer(tokens, inner):
    """η → 0: the coefficient → the constant η, i.e. plain SGD at lr·η / plain Adam (scale-invariant).

    (η → ∞ is *not* plain: it tends to 1/‖θ_i‖, a row-normalised gradient.)
    """
    eta, lr = 1e-6, 1e-2
    a, b = _lora_model(), _lora_model()
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    if inner == "sgd":
        plain, wrapped = torch.optim.SGD(pa, lr=lr), ALLoRA(torch.optim.SGD(pb, lr=lr / eta), eta=eta, model=b)
    else:
        plain = torch.optim.Adam(pa, lr=lr, eps=1e-20)
        wrapped = ALLoRA(b, eta=eta, optimizer_cls=torch.optim.Adam, lr=lr, eps=1e-20 * eta)
    for _ in range(3):
        for opt, model in ((plain, a), (wrapped, b)):
            opt.zero_grad()
            _backward(model, tokens)
            opt.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_large_eta_limit_normalises_rows():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    p.grad = torch.ones(2, 2)
    opt = ALLoRA(torch.optim.SGD([p], lr=1.0), eta=1e9)
    opt.scale_gradients()
    torch.testing.assert_close(p.grad, torch.tensor([[0.2, 0.2], [0.5, 0.5]]))


def test_training_with_allora_lowers_the_loss(tokens):
    model = _lora_model()
    opt = ALLoRA(model, eta=2.0, lr=3e-2)
    model.train()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        losses.append(_backward(model, tokens))
        opt.step()
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # falls every step
    assert losses[-1] < 0.95 * losses[0], losses


def test_only_factors_are_scaled_and_others_pass_through(tokens):
    model = tiny_llama()
    lorakit.inject(model, allora_lora_config(r=2, modules_to_save=["lm_head"]))
    head = model.get_submodule("lm_head")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ALLoRA(torch.optim.SGD(params, lr=0.1), eta=2.0, model=model)
    assert all(p is not t for p in opt.factors for t in head.parameters())
    _backward(model, tokens)
    g = {id(p): p.grad.clone() for p in head.parameters() if p.grad is not None}
    opt.scale_gradients()
    assert g and all(torch.equal(p.grad, g[id(p)]) for p in head.parameters() if p.grad is not None)


def test_works_with_lr_scheduler_and_state_dict(tokens):
    model = _lora_model()
    opt = ALLoRA(model, eta=2.0, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.zero_grad()
    _backward(model, tokens)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ALLoRA(model, eta=2.0, lr=1e-2)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(opt.state)


@pytest.mark.parametrize("eta", [0, -1.0, float("inf"), True])
def test_bad_eta(eta):
    with pytest.raises(ConfigError, match="eta must be a positive finite number"):
        ALLoRA([torch.nn.Parameter(torch.zeros(2, 2))], eta=eta, lr=0.1)


def test_model_without_factors_is_an_error():
    from lorakit.methods.lamda import LamdaConfig

    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=2, target="q_proj"))
    assert len(factor_params(model)) == 2  # LaMDA's lora_B (its A is a frozen buffer)
    with pytest.raises(ConfigError, match="adapter 'other'"):
        factor_params(model, "other")
