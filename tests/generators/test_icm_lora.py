"""ICM-LoRA (arXiv:2501.17635): a CVAE over flattened per-task LoRAs conditioned on a task
vector from the base model; its output is a plain LoRA."""

import dataclasses

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.core.inject import state
from lorakit.core.io import export_peft
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.generators import CVAE, IcmLoraConfig, IcmLoraGenerator, generate_adapter, train_icm_lora
from lorakit.generators.family import train_task_loras
from lorakit.generators.icm_lora import REFERENCE_CHANNELS
from tests.conftest import logits_of
from tests.generators.conftest import ICM, TASK_LORA, family, sharp_llama


@pytest.fixture(scope="module")
def trained():
    """(model, tasks, LoRA snapshots per task, generator) on 6 tasks."""
    model = sharp_llama()
    tasks = family(6)
    samples = train_task_loras(model, tasks, TASK_LORA)
    return model, tasks, samples, train_icm_lora(model, tasks, ICM, TASK_LORA, samples=samples)


def test_cvae_shapes_and_padding():
    cvae = CVAE(input_length=101, condition_dim=7, latent_dim=5, channels=[4, 8], kernel_size=3)
    assert cvae.padded_length == 104 and cvae.last_length == 26  # granule 2^2
    x, c = torch.randn(3, 101), torch.randn(3, 7)
    mu, log_var = cvae.encode(x, c)
    assert mu.shape == (3, 5) and log_var.shape == (3, 5)
    assert cvae.decode(mu, c).shape == (3, 104)
    loss, recons, kld = cvae(x, c)
    assert loss.dim() == 0 and torch.allclose(loss, recons + 0.005 * kld)
    ref = CVAE(input_length=5000, condition_dim=7, latent_dim=8, channels=REFERENCE_CHANNELS)
    assert ref.padded_length == 8192 and ref.last_length == 2  # the reference's 12 levels, 4096 granule


def test_reconstruction_loss_decreases(trained):
    _, _, _, gen = trained
    first, last = sum(gen.recon_losses[:10]) / 10, sum(gen.recon_losses[-10:]) / 10
    assert last < 0.5 * first
    assert len(gen.losses) == ICM.steps and all(t >= r for t, r in zip(gen.losses, gen.recon_losses))


def test_generator_layout_normalisation_and_conditioning(trained):
    model, tasks, samples, gen = trained
    n_params = sum(t.numel() for t in samples[0][0].values())
    assert gen.num_params == n_params == 2048  # tiny Llama, all-linear, r = 2
    theta = gen.flatten(samples[0][-1])
    assert all(torch.equal(v, samples[0][-1][k]) for k, v in gen.unflatten(theta).items())
    # μ is the mean of all training snapshots
    all_theta = torch.stack([gen.flatten(s) for ss in samples for s in ss])
    assert torch.allclose(gen.param_mean, all_theta.mean(0), atol=1e-6)
    # the generated LoRA of a training task is nearer its own LoRA than the other tasks' LoRAs
    finals = torch.stack([gen.flatten(s[-1]) for s in samples])
    for i, t in enumerate(tasks):
        g = gen.flatten(gen.generate_state(model, t.context))
        d = ((finals - g) / gen.param_scale).pow(2).sum(1)
        assert int(d.argmin()) == i


def test_training_and_generation_are_deterministic(trained):
    model, tasks, samples, gen = trained
    short = dataclasses.replace(ICM, steps=10)
    a, b = (train_icm_lora(model, tasks, short, TASK_LORA, samples=samples) for _ in range(2))
    assert a.losses == b.losses and a.losses == gen.losses[:10]  # same seed: the same run
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = train_icm_lora(model, tasks, dataclasses.replace(short, seed=1), TASK_LORA, samples=samples)
    assert other.losses != a.losses
    ctx = tasks[0].context
    s1, s2 = gen.generate_state(model, ctx), gen.generate_state(model, ctx)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    gen.config.sample_z = True
    try:
        z1, z2, z3 = (gen.generate_state(model, ctx, seed=s) for s in (3, 3, 4))
    finally:
        gen.config.sample_z = False
    assert all(torch.equal(z1[k], z2[k]) for k in z1) and not all(torch.equal(z1[k], z3[k]) for k in z1)


def test_generated_adapter_loads_as_a_normal_lora_and_exports_to_peft(trained, tmp_path):
    model, tasks, _, gen = trained
    ids = tasks[0].eval
    base = logits_of(model, ids)
    generate_adapter(model, gen, tasks[0].context, name="icm")
    try:
        assert state(model).configs["icm"].method == "lora" and state(model).configs["icm"].r == TASK_LORA.r
        want = logits_of(model, ids)
        assert not torch.allclose(want, base, atol=1e-3)
        lorakit.save(model, tmp_path / "a", name="icm")
        fresh = sharp_llama()
        lorakit.load(fresh, tmp_path / "a")
        assert torch.allclose(logits_of(fresh, ids), want, atol=1e-5)
        export_peft(model, tmp_path / "peft", name="icm")
        assert torch.allclose(logits_of(PeftModel.from_pretrained(sharp_llama(), tmp_path / "peft"), ids), want, atol=1e-5)
    finally:
        lorakit.delete(model, "icm")
    assert torch.equal(logits_of(model, ids), base)


def test_generator_save_load_round_trip(trained, tmp_path):
    model, tasks, _, gen = trained
    gen.save(tmp_path / "g")
    back = IcmLoraGenerator.load(tmp_path / "g")
    assert back.layout == gen.layout and back.config == gen.config and back.task_lora == gen.task_lora
    s1, s2 = gen.generate_state(model, tasks[1].context), back.generate_state(model, tasks[1].context)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    from lorakit.generators import GenerativeAdapter

    with pytest.raises(AdapterFileError, match="expected 'generative_adapter'"):
        GenerativeAdapter.load(tmp_path / "g", model)


def test_config_and_input_errors(trained):
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        IcmLoraConfig(kernel_size=4)
    with pytest.raises(ConfigError, match="channels must be a non-empty list"):
        IcmLoraConfig(channels=[])
    with pytest.raises(ConfigError, match=r"channels\[i\] must be a positive integer"):
        IcmLoraConfig(channels=[8, 0])
    with pytest.raises(ConfigError, match="pool must be one of"):
        IcmLoraConfig(pool="max")
    with pytest.raises(ConfigError, match="kld_weight must be a finite number >= 0"):
        IcmLoraConfig(kld_weight=-0.1)
    with pytest.raises(ConfigError, match="context_draws must be an integer >= 0"):
        IcmLoraConfig(context_draws=-1)
    with pytest.raises(ConfigError, match="lr must be a positive finite number"):
        IcmLoraConfig(lr=0)
    with pytest.raises(ConfigError, match="layer must be an integer"):
        IcmLoraConfig(layer=1.5)
    model, tasks, samples, gen = trained
    with pytest.raises(ConfigError, match="at least one LoRA snapshot per task"):
        train_icm_lora(model, tasks, ICM, TASK_LORA, samples=samples[:2])
    with pytest.raises(ConfigError, match="at least one task"):
        train_icm_lora(model, [], ICM, TASK_LORA)
    with pytest.raises(ConfigError, match="do not match the generator's layout"):
        gen.flatten({k: v for k, v in list(samples[0][0].items())[:3]})
