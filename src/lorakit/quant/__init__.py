"""Quantized frozen bases (int8 / int4 / int2, per-group) with LoRA on top, and LREC
(INT2.1, arXiv:2306.08162) to train that LoRA against the full-precision model.

    from lorakit.quant import quantize_model, lrec_train, merge_lora_into_quantized

    teacher = copy.deepcopy(model)
    quantize_model(model, bits=4, group_size=64)          # nn.Linear -> QuantLinear (packed)
    lorakit.inject(model, LoraConfig(r=8, target="all-linear"))
    lrec_train(model, teacher, batches, steps=200, lr=1e-3)
    errors = merge_lora_into_quantized(model, "default")  # optional: re-quantize W + ΔW
"""

from lorakit.quant.lrec import kl_to_teacher, lrec_loss, lrec_train, lrec_training_loss
from lorakit.quant.quantize import (
    SUPPORTED_BITS,
    QuantLinear,
    check_quant_settings,
    dequantize_weight,
    load_quantized,
    merge_lora_into_quantized,
    pack_codes,
    quantize_model,
    quantize_weight,
    quantized_modules,
    quantized_nbytes,
    save_quantized,
    unpack_codes,
)

__all__ = [
    "SUPPORTED_BITS",
    "QuantLinear",
    "check_quant_settings",
    "dequantize_weight",
    "kl_to_teacher",
    "load_quantized",
    "lrec_loss",
    "lrec_train",
    "lrec_training_loss",
    "merge_lora_into_quantized",
    "pack_codes",
    "quantize_model",
    "quantize_weight",
    "quantized_modules",
    "quantized_nbytes",
    "save_quantized",
    "unpack_codes",
]
