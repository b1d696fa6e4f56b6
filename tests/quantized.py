"""Tiny checkpoints in the stored layouts of quantized models, each built from a plain one.

Where a format's own reference code runs on a CPU here, it builds the checkpoint: the
compressed-tensors package's compressors, transformers' fp8 quantize op. Otherwise the published
formula is written out, with its source named: AutoGPTQ's and AutoAWQ's packing, the OCP
Microscaling (MX) spec for MXFP4 as gpt-oss stores it, and bitsandbytes' 4-bit serialization as
transformers saves it. Every builder copies the plain checkpoint's support files, writes the
quantized tensors beside its unquantized ones, and returns the directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _copy_support(plain: Path, path: Path, quantization: dict) -> dict[str, torch.Tensor]:
    """`path` with the plain checkpoint's files but its weights; config.json with `quantization`."""
    shutil.copytree(plain, path, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return load_file(plain / "model.safetensors")


def linear_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in tensors if name.endswith(".weight") and name.split(".")[-2] in LINEAR]


# ---------------------------------------------------------------------------------------------
# compressed-tensors, through its own compressors


def compressed_tensors(path: Path, plain: Path, *, format: str = "pack-quantized", bits: int = 4,
                       kind: str = "int", strategy: str = "group", group: int | None = 16,
                       symmetric: bool = True) -> Path:
    """A compressed-tensors checkpoint of `plain`, its linear layers (not the head) quantized with the
    package's own scheme, observers' min/max and compressor, saved as llm-compressor saves it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy,
                               group_size=group if strategy == "group" else None)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(module, "weight_scale"):
            continue
        weight = module.weight.data
        if strategy == "group":
            grouped = weight.reshape(weight.shape[0], -1, group)
            low, high = grouped.amin(-1), grouped.amax(-1)
        elif strategy == "channel":
            low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
        else:
            low, high = weight.amin().reshape(1), weight.amax().reshape(1)
        scale, zero = calculate_qparams(low, high, scheme.weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=format)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (plain / name).is_file():
            shutil.copyfile(plain / name, path / name)
    return path


# ---------------------------------------------------------------------------------------------
# fp8 with block scales (DeepSeek-V3, Qwen3 FP8), through transformers' own quantize op


def fp8_block(path: Path, plain: Path, *, block: int = 16) -> Path:
    """DeepSeek-V3's layout: each linear weight in float8_e4m3fn and a float32 `weight_scale_inv`
    per `block` × `block` tile (its largest magnitude ÷ 448), quantized by transformers' Fp8Quantize."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [block, block]}
    tensors = _copy_support(plain, path, quantization)

    class Quantizer:  # what Fp8Quantize asks of transformers' hf_quantizer: the config
        quantization_config = FineGrainedFP8Config(weight_block_size=[block, block])

    quantize = Fp8Quantize(Quantizer())
    out = {}
    for name, tensor in tensors.items():
        if name in linear_weights(tensors):
            out.update(quantize.convert({name: tensor.float()}))
        else:
            out[name] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ: the published packing, written out


def _int_quantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Per group of `group` input columns: codes [out, in] in 0..2^bits-1, scales and zeros [in/group, out]."""
    out_features, in_features = weight.shape
    grouped = weight.double().reshape(out_features, in_features // group, group)
    top = 2**bits - 1
    if symmetric:
        scale = grouped.abs().amax(-1) * 2 / top
        zero = torch.full_like(scale, (top + 1) / 2)
    else:
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        scale = (high - low) / top
        zero = torch.round(-low / scale)
    scale = scale.clamp(min=1e-8).half().double()
    codes = torch.clamp(torch.round(grouped / scale[..., None]) + zero[..., None], 0, top)
    return codes.reshape(out_features, in_features).to(torch.int64), scale.T.contiguous(), zero.T.contiguous()


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's `qweight`: 32/bits consecutive rows per int32, the first in the lowest bits."""
    per = 32 // bits
    rows = codes.reshape(codes.shape[0] // per, per, *codes.shape[1:])
    packed = torch.zeros(rows.shape[0], *codes.shape[1:], dtype=torch.int64)
    for k in range(per):
        packed |= rows[:, k] << (bits * k)
    return _as_int32(packed)


def _as_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) as int32 with the same bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _pack_columns(codes: torch.Tensor, bits: int, order: list[int]) -> torch.Tensor:
    """32/bits consecutive columns per int32, nibble k holding column `order[k]` of its group."""
    per = 32 // bits
    packed = torch.zeros(codes.shape[0], codes.shape[1] // per, dtype=torch.int64)
    for k in range(per):
        packed |= codes[:, order[k]::per] << (bits * k)
    return _as_int32(packed)


def gptq(path: Path, plain: Path, *, bits: int = 4, group: int = 16, act_order: bool = False,
         symmetric: bool = True, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """AutoGPTQ's layout (`QuantLinear.pack`, its v1 checkpoint format): `qweight` [in·bits/32, out]
    int32 packing input rows, `qzeros` [groups, out·bits/32] int32 holding zero − 1, `scales`
    [groups, out] float16, `g_idx` [in] int32 (with act-order, groups follow a permutation of the
    inputs). Returns the directory and each weight dequantized in float64 (scale × (q − zero))."""
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                    "sym": symmetric, "checkpoint_format": "gptq"}
    tensors = _copy_support(plain, path, quantization)
    generator = torch.Generator().manual_seed(seed)
    out, dequantized = {}, {}
    for name, tensor in tensors.items():
        if name not in linear_weights(tensors):
            out[name] = tensor
            continue
        weight = tensor.double()
        in_features = weight.shape[1]
        order = torch.randperm(in_features, generator=generator) if act_order else torch.arange(in_features)
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[order] = torch.arange(in_features) // group  # input order[j] falls in group j // group
        codes, scales, zeros = _int_quantize(weight[:, order], bits, group, symmetric)
        codes = codes[:, torch.argsort(order)]  # back to the inputs' own order
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.qweight"] = _pack_rows(codes.T.contiguous(), bits)
        out[f"{prefix}.qzeros"] = _pack_columns((zeros - 1).to(torch.int64), bits, list(range(32 // bits)))
        out[f"{prefix}.scales"] = scales.half()
        out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        dequantized[name] = (scales.T[:, g_idx] * (codes.double() - zeros.T[:, g_idx]))
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path, dequantized


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM packing: nibble k holds column AWQ_ORDER[k] of its eight


def awq(path: Path, plain: Path, *, group: int = 16) -> tuple[Path, dict[str, torch.Tensor]]:
    """AutoAWQ's GEMM layout (`WQLinear_GEMM.from_linear`): `qweight` [in, out/8] and `qzeros`
    [groups, out/8] int32 packing output columns in the order 0, 2, 4, 6, 1, 3, 5, 7, `scales`
    [groups, out] float16, asymmetric 4-bit. Returns the directory and the float64 dequantized weights."""
    quantization = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    tensors = _copy_support(plain, path, quantization)
    out, dequantized = {}, {}
    for name, tensor in tensors.items():
        if name not in linear_weights(tensors):
            out[name] = tensor
            continue
        codes, scales, zeros = _int_quantize(tensor.double(), 4, group, symmetric=False)
        prefix = name.removesuffix(".weight")
        out[f"{prefix}.qweight"] = _pack_columns(codes.T.contiguous(), 4, AWQ_ORDER)
        out[f"{prefix}.qzeros"] = _pack_columns(zeros.to(torch.int64), 4, AWQ_ORDER)
        out[f"{prefix}.scales"] = scales.half()
        groups = torch.arange(tensor.shape[1]) // group
        dequantized[name] = scales.T[:, groups] * (codes.double() - zeros.T[:, groups])
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path, dequantized


# ---------------------------------------------------------------------------------------------
# MXFP4, as gpt-oss stores its experts (OCP Microscaling spec: 32 e2m1 values share an e8m0 scale)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


def mxfp4_encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` [..., n] (n a multiple of 32) as MXFP4: blocks [..., n/32, 16] uint8 (element 2j in the
    low nibble, 2j + 1 in the high one) and scales [..., n/32] uint8 (the shared exponent + 127), the
    exponent floor(log2(max |x|)) − 2 of the spec (e2m1's largest exponent is 2)."""
    groups = values.double().reshape(*values.shape[:-1], -1, 32)
    top = groups.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(top)) - 2
    scaled = groups / torch.pow(2.0, exponent)[..., None]
    codes = (scaled[..., None] - E2M1).abs().argmin(-1)  # the nearest e2m1 value (±6 at most)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def mxfp4_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float64 values [..., n] of MXFP4 blocks and scales."""
    low, high = E2M1[(blocks & 0x0F).long()], E2M1[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], 32)
    values = values * torch.pow(2.0, scales.double() - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    settings.update(overrides)
    return GptOssConfig(**settings)


def build_gpt_oss(path: Path, *, seed: int) -> Path:
    """A plain tiny gpt-oss (fused experts `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`)."""
    from transformers import GptOssForCausalLM

    from builders import word_tokenizer

    torch.manual_seed(seed)
    GptOssForCausalLM(gpt_oss_config()).save_pretrained(path)
    word_tokenizer(128).save_pretrained(path)
    return path


def mxfp4_gpt_oss(path: Path, plain: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """gpt-oss's release layout: each experts' `gate_up_proj` / `down_proj` as `*_blocks`
    [E, out, in/32, 16] and `*_scales` [E, out, in/32] (the class's [E, in, out] transposed), the rest as
    it is. Returns the directory and each expert tensor decoded in float64, in the class's layout."""
    tensors = _copy_support(plain, path, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    out, decoded = {}, {}
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_encode(tensor.transpose(1, 2))  # [E, out, in]
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
            decoded[name] = mxfp4_decode(blocks, scales).transpose(1, 2)
        else:
            out[name] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path, decoded


# ---------------------------------------------------------------------------------------------
# bitsandbytes 4-bit, as transformers serializes a `Linear4bit` (bitsandbytes' `QuantState.as_dict`)

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def bnb_4bit(path: Path, plain: Path, *, blocksize: int = 64) -> Path:
    """bitsandbytes' NF4 layout: `weight` uint8 [out·in/2, 1] (two codes a byte), `weight.absmax`
    float32 per block of `blocksize`, `weight.quant_map` float32 [16], and the JSON quant state as
    `weight.quant_state.bitsandbytes__nf4` uint8."""
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": False}
    tensors = _copy_support(plain, path, quantization)
    out = {}
    for name, tensor in tensors.items():
        if name not in linear_weights(tensors):
            out[name] = tensor
            continue
        flat = tensor.float().reshape(-1, blocksize)
        absmax = flat.abs().amax(-1)
        codes = ((flat / absmax[:, None])[..., None] - NF4).abs().argmin(-1).reshape(-1)
        out[name] = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
        out[f"{name}.absmax"] = absmax
        out[f"{name}.quant_map"] = NF4.clone()
        state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": list(tensor.shape)}
        out[f"{name}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path
