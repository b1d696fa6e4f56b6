"""A checkpoint's quantized format, from its config: its logical tensors and each one's decoder."""

from __future__ import annotations

from typing import Any

from mergecli.errors import CheckpointError
from mergecli.io.dequantize import Decoder, FormatError, Parts, ReadStored, compressed_tensors, fp8_block
from mergecli.io.packed_formats import gptq_family, mxfp4
from mergecli.io.quantized import FLOAT8, NAME_SIGNS, quantization_config, stored_format
from mergecli.io.safetensors import TensorInfo

READERS = {"fp8": fp8_block, "compressed-tensors": compressed_tensors, "mxfp4": mxfp4,
           "gptq": lambda s, t, take: gptq_family(s, t, take, "gptq"),
           "awq": lambda s, t, take: gptq_family(s, t, take, "awq")}


def readable_format(config: dict | None) -> str | None:
    """The quant_method of a config whose format mergecli reads, else None."""
    settings = quantization_config(config)
    method = str((settings or {}).get("quant_method", "")).lower()
    return method if method in READERS else None


def decoders_for(config: dict | None, tensors: dict[str, TensorInfo],
                 read: ReadStored) -> tuple[dict[str, TensorInfo], dict[str, Decoder]]:
    """The logical tensors of a checkpoint stored in a format `readable_format` names (the unquantized
    ones as they are, in the stored order), and the decoder of each quantized one. `read` reads a stored
    tensor (a pack-quantized weight's `weight_shape`, when it opens).

    Raises:
        FormatError: a tensor the format does not account for (a part of no quantized tensor, a code or
            scale under another name), or parts that do not match the config.
    """
    settings = quantization_config(config) or {}
    method = str(settings.get("quant_method", "")).lower()
    taker = Parts(tensors, read)
    found = READERS[method](settings, tensors, taker)
    by_part = {decoder.parts[0]: decoder for decoder in found}
    logical: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in by_part:
            logical[by_part[name].info.name] = by_part[name].info
        elif name in taker.taken:
            continue
        elif info.dtype in FLOAT8 or any(p.search(name) for p, _ in NAME_SIGNS) or name.endswith("weight_shape"):
            raise FormatError(f"tensor {name!r} ({str(info.dtype)[6:]}) is part of no quantized weight that its "
                              "quantization_config describes")
        else:
            logical[name] = info
    clashes = [d.info.name for d in found if d.info.name in tensors and d.info.name not in taker.taken]
    if clashes:
        raise FormatError(f"tensor {clashes[0]!r} is stored both quantized and as it is")
    return logical, {decoder.info.name: decoder for decoder in found}


def readable(checkpoint: Any, config: dict | None = None) -> Any:
    """The checkpoint (an io/checkpoint.py Checkpoint: that module imports this one), its quantized tensors
    seen dequantized where its config names a format mergecli reads. Any other quantized format is refused:
    merged as plain tensors, its codes and scales would give a wrong model (or one whose weights transformers
    fills at random).

    Raises:
        CheckpointError: naming the format and what shows it, or what does not match its config.

    Args:
        config: its config, where it has no config.json yet (an output being written).
    """
    config = config or checkpoint.config()
    found = stored_format(config, checkpoint.tensors)
    if found is None:
        return checkpoint
    if readable_format(config) is not None:
        try:
            logical, decoders = decoders_for(config, checkpoint.tensors, checkpoint.read_stored)
        except FormatError as exc:
            checkpoint.close()
            raise CheckpointError(checkpoint.source, f"stored as {found.name}, but {exc}") from None
        checkpoint.stored, checkpoint.tensors, checkpoint.decoders = checkpoint.tensors, logical, decoders
        return checkpoint
    checkpoint.close()
    raise CheckpointError(checkpoint.source, f"its weights are stored quantized, as {found.name} ({found.evidence}), "
                                             "which mergecli does not read",
                          hint="merge the model's unquantized release (bfloat16 / float16 / float32), or one "
                               "in fp8, compressed-tensors, MXFP4, GPTQ or AWQ")
