"""The fused weighted sum: chunk by chunk into the output dtype, it rounds every element exactly as
summing whole tensors (in float32 for 16-bit inputs, float64 where one is float32) and casting once does,
for any chunk boundary, dtype and weight."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergecli.methods.average import weighted_sum

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3000), chunk=st.integers(1, 700), models=st.integers(1, 4),
       dtypes=st.lists(st.sampled_from(FLOATS), min_size=4, max_size=4),
       out_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       weights=st.lists(st.sampled_from([1.0, 0.5, 0.3, 1.75, -0.25, 3.0]), min_size=4, max_size=4),
       divisor=st.sampled_from([1.0, 3.0, 2.0, 0.7]), seed=st.integers(0, 2**16))
def test_chunked_sum_rounds_like_the_whole_tensor_sum(size, chunk, models, dtypes, out_dtype, weights, divisor,
                                                      seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(size, generator=generator).to(dtypes[i]) for i in range(models)]
    wide = torch.float64 if torch.float32 in dtypes[:models] else torch.float32
    reference = tensors[0].to(wide, copy=True).mul_(weights[0])  # whole tensors, the same operations
    for tensor, weight in zip(tensors[1:], weights[1:models]):
        reference.add_(tensor.to(wide), alpha=weight)
    reference = reference.div_(divisor).to(out_dtype)

    before = [t.clone() for t in tensors]
    out = torch.empty(size, dtype=out_dtype)
    got = weighted_sum(tensors, weights[:models], divisor=divisor, out=out, scratch=torch.empty(chunk))
    assert got is out and torch.equal(out, reference)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))  # the inputs are only read


def test_a_wide_output_is_summed_in_place_and_float32_inputs_in_float64():
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0])
    out = torch.empty(2, dtype=torch.float64)
    assert weighted_sum([a, b], [1.0, 1.0], divisor=2.0, out=out) is out
    assert out.tolist() == [2.0, 3.0]
    total = weighted_sum([b, b], [0.5, 0.25])
    assert total.dtype == torch.float64 and total.tolist() == [2.25, 3.0]
    half = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    assert weighted_sum([half, half], [0.5, 0.25]).dtype == torch.float32
