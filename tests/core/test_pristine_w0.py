"""W0-dependent adapters (Bone "bat", Hydra) read W0 from their layer: no private copy per
adapter; one snapshot per layer only while something is merged; full unmerge restores W0
bit-exactly."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError
from lorakit.methods.bone import BoneConfig
from lorakit.methods.hydra import HydraConfig
from lorakit.methods.lora import LoraConfig
from tests.conftest import logits_of, randomize, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def _adapter_tensor_numel(model, name):
    return sum(t.numel() for layer in adapted_layers(model).values() if name in layer.adapters
               for t in list(layer.adapters[name].parameters()) + list(layer.adapters[name].buffers()))


@pytest.mark.parametrize("cfg", [BoneConfig(r=8, target="q_proj"), HydraConfig(r=4, target="q_proj")],
                         ids=["bone", "hydra"])
def test_no_private_copy_of_w0(cfg):
    model = tiny_llama()
    lorakit.inject(model, cfg)
    n_params = sum(p.numel() for layer in adapted_layers(model).values() for p in layer.adapters["default"].parameters())
    assert _adapter_tensor_numel(model, "default") == n_params  # parameters only, no W0-sized buffers


@pytest.mark.parametrize("factory, cfg", [
    (tiny_llama, BoneConfig(r=8, target="q_proj")),
    (tiny_llama, HydraConfig(r=4, target=["q_proj", "v_proj"])),
    (tiny_gpt2, HydraConfig(r=4, target="c_attn")),  # Conv1D weight (transposed view) with a bias
], ids=["bone-llama", "hydra-llama", "hydra-gpt2-bias"])
def test_merge_keeps_one_snapshot_and_unmerge_restores_w0_exactly(factory, cfg):
    model = factory()
    layers = adapted_layers(lorakit.inject(model, cfg))
    randomize(model)
    originals = {p: (l.weight_view().detach().clone(), None if getattr(l.base, "bias", None) is None
                     else l.base.bias.detach().clone()) for p, l in layers.items()}
    deltas = {p: l.adapters["default"].delta_weight().detach().clone() for p, l in layers.items()}
    unmerged = logits_of(model, IDS)

    lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, IDS), unmerged, rtol=1e-5, atol=1e-5)
    for p, layer in layers.items():
        assert layer._w0 is not None and torch.equal(layer._w0, originals[p][0])
        assert torch.equal(layer.adapters["default"].delta_weight(), deltas[p])  # ΔW still from W0
        assert not torch.equal(layer.weight_view(), originals[p][0])

    lorakit.unmerge(model)
    for p, layer in layers.items():
        assert layer._w0 is None  # the snapshot is released
        assert torch.equal(layer.weight_view(), originals[p][0])  # bit-exact, not W0 + ΔW - ΔW
        if originals[p][1] is not None:
            assert torch.equal(layer.base.bias, originals[p][1])
    torch.testing.assert_close(logits_of(model, IDS), unmerged, rtol=0, atol=0)


def test_plain_lora_merge_takes_no_snapshot():
    model = tiny_llama()
    layers = adapted_layers(lorakit.inject(model, LoraConfig(r=4, target="q_proj")))
    randomize(model)
    lorakit.merge(model)
    assert all(layer._w0 is None for layer in layers.values())


def test_two_w0_adapters_on_one_layer_share_the_snapshot():
    model = tiny_llama()
    lorakit.inject(model, BoneConfig(r=8, target="q_proj"), name="bone")
    lorakit.inject(model, HydraConfig(r=4, target="q_proj"), name="hydra")
    randomize(model, "bone", seed=1, std=0.02)
    randomize(model, "hydra", seed=2)
    lorakit.activate(model, ["bone", "hydra"])
    both = logits_of(model, IDS)
    lorakit.merge(model, ["bone"])
    torch.testing.assert_close(logits_of(model, IDS), both, rtol=1e-5, atol=1e-5)  # hydra still reads W0
    lorakit.merge(model, ["hydra"])
    torch.testing.assert_close(logits_of(model, IDS), both, rtol=1e-5, atol=1e-5)
    layer = adapted_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["bone"].spec.w0() is layer._w0 and layer.adapters["hydra"].spec.w0() is layer._w0


def test_w0_adapter_onto_a_merged_layer_without_snapshot_is_refused():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target="q_proj"), name="lora")
    randomize(model, "lora")
    lorakit.merge(model)
    weights = {p: l.weight_view().detach().clone() for p, l in adapted_layers(model).items()}
    with pytest.raises(AdapterError, match=r"merged into this layer.*unmerge them before adding 'hydra'"):
        lorakit.inject(model, HydraConfig(r=4, target="q_proj"), name="h")
    assert lorakit.adapter_names(model) == ["lora"]  # nothing attached, weights untouched
    assert all(torch.equal(l.weight_view(), weights[p]) for p, l in adapted_layers(model).items())
