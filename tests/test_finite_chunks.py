"""finite's check walks large tensors in chunks (bounded temporaries) and still finds every NaN/inf."""

import pytest
import torch

from mmcompress import finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_found_in_any_chunk(dtype):
    t = torch.zeros(5 * finite._CHUNK + 17, dtype=dtype)  # the float scan reads 4 * _CHUNK at a time
    assert finite.first_non_finite([("w", t)]) is None
    for where, value in [(0, "nan"), (finite._CHUNK - 1, "inf"), (finite._CHUNK, "-inf"), (3 * finite._CHUNK + 5, "nan"),
                         (4 * finite._CHUNK - 1, "-inf"), (4 * finite._CHUNK, "nan"), (-1, "inf")]:
        t[where] = float(value)
        assert finite.first_non_finite([("ok", torch.ones(3)), ("w", t.view(-1, 1))]) == "w", (where, value)
        t[where] = 0


def test_non_contiguous_and_module():
    t = torch.zeros(2 * finite._CHUNK // 64 + 3, 64).t()  # not contiguous
    assert finite.first_non_finite([("t", t)]) is None
    t[5, -1] = float("nan")
    assert finite.first_non_finite([("t", t)]) == "t"
    lin = torch.nn.Linear(4, 4)
    finite.check_module(lin, "input weight")
    with torch.no_grad():
        lin.bias[3] = float("inf")
    with pytest.raises(finite.NonFiniteError, match="input weight bias"):
        finite.check_module(lin, "input weight")
    assert finite.first_non_finite([("i", torch.arange(5)), ("m", torch.empty(3, device="meta"))]) is None
