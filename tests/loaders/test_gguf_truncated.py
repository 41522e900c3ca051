"""A GGUF cut short is named as truncated at the first tensor it cuts, with the tensor's type,
shape and byte range against the file's size (issue 17 item 10: the message was numpy's
"cannot reshape array of size ..." inside "not a valid GGUF file")."""

from __future__ import annotations

import os
import re

import pytest

from stream_run.loaders import FormatError
from stream_run.loaders.gguf_file import open_gguf
from stream_run.models import REGISTRY


@pytest.mark.parametrize("keep", [0.02, 0.5, -1000])
def test_a_cut_file_names_the_tensor_it_cuts(smollm2_gguf, tmp_path, keep):
    size = os.path.getsize(smollm2_gguf)
    n = size + keep if keep < 0 else int(size * keep)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(n))
    with pytest.raises(FormatError) as info:
        open_gguf(str(cut), REGISTRY)
    msg = str(info.value)
    assert re.fullmatch(
        rf"{re.escape(str(cut))}: the file is truncated: tensor '[\w.]+' \((Q4_1|Q8_0|F32), "
        rf"\d+( x \d+)?\) takes bytes \d+ to (\d+), the file has {n}; hint: re-download it "
        r"\(compare its size with the source's\)", msg), msg
    assert int(re.search(r"to (\d+),", msg).group(1)) > n
    assert "reshape" not in msg and "\n" not in msg


def test_the_whole_file_opens(smollm2_gguf):
    index, _ = open_gguf(smollm2_gguf, REGISTRY)
    assert index.units
