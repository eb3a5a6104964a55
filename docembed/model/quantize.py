"""Quantize: the one INT8 configuration docembed offers on the CPU (``--precision int8``).

Dynamic INT8 (weights int8 per output channel, activations quantized per batch to the full 8-bit
range) on every Linear of a BERT-style encoder except layer 0's FFN output projection, which stays
fp32. Measured against fp32 on 1,000 real documents (``bench/int8_frontier.py``, all-MiniLM-L6-v2,
2 threads, ``bench/results/int8-frontier.md``): mean cosine 0.995, minimum 0.989, top-10 neighbour
overlap 0.908, 2.05x the fp32 speed on an AMD Zen 4 (the speed-up depends on the CPU's int8
instructions; run the bench on yours). Torch's plain
defaults (per-tensor weights, 7-bit activations) fail every floor (mean 0.927, min 0.83, top-10 0.74); per-channel weights and 8-bit activations are what fixed it.

8-bit activations are safe only where the CPU has VNNI (int32 accumulation without the int16
saturation of older AVX2/AVX-512 kernels), so int8 is offered only on such CPUs (``numerics``).
"""

from __future__ import annotations

from docembed.errors import ModelError

# Layer 0 was the most int8-sensitive layer, and its FFN output projection the most sensitive op in it.
KEEP_FP32 = "encoder.layer.0.output.dense"


def quantize_int8(transformer) -> list[str]:
    """Quantize the transformers model ``transformer`` IN PLACE (``quantize_dynamic`` would otherwise
    return a new module); returns the names of the int8 Linear layers, checked on the model itself."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    linears = [name for name, module in transformer.named_modules() if type(module) is torch.nn.Linear]
    if KEEP_FP32 not in linears:
        raise ModelError("--precision int8 is validated for BERT-style encoders only (it keeps "
                         f"{KEEP_FP32} in fp32); this model has no such layer: use fp32")
    targets = [name for name in linears if name != KEEP_FP32]
    quantize_dynamic(transformer, {name: per_channel_dynamic_qconfig for name in targets},
                     dtype=torch.qint8, inplace=True)
    int8 = torch.ao.nn.quantized.dynamic.Linear
    changed = sorted(n for n, m in transformer.named_modules() if isinstance(m, int8))
    if changed != sorted(targets):
        raise ModelError(f"int8 quantization did not take: {len(changed)} of {len(targets)} layers changed")
    for module in transformer.modules():
        if isinstance(module, int8):
            module.version = 3  # full 8-bit activations (version < 4 turns reduce_range off)
    return changed
