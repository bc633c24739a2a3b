"""rsb.hardware: `auto` precision is what is fast on the machine; a precision the device lacks is refused before any
work. (The stage trains in the precision the params say: test_train.py.)"""

from __future__ import annotations

import pytest
from conftest import write_params

from rsb.paramfile import ConfigError


@pytest.mark.parametrize(
    "cuda, cuda_bf16, flags, expect",
    [
        (True, True, set(), "bf16"),  # Ampere and newer
        (True, False, set(), "fp16"),  # V100 and older
        (False, None, {"avx512f", "avx512_bf16"}, "bf16"),  # Zen 4, Cooper Lake: native bf16
        (False, None, {"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
        (False, None, {"avx512f", "avx512bw", "avx512_vnni"}, "fp32"),  # AVX-512 without bf16: emulated, slower
        (False, None, {"avx2", "fma"}, "fp32"),
        (False, None, set(), "fp32"),
    ],
)
def test_auto_precision_is_what_is_fast(cuda, cuda_bf16, flags, expect):
    from rsb.hardware import auto_precision

    assert auto_precision(cuda=cuda, cuda_bf16=cuda_bf16, flags=flags) == expect


def test_precision_the_device_lacks_is_refused(tmp_path, prepared, monkeypatch):
    from stages.train import main

    monkeypatch.chdir(tmp_path)
    p = write_params(tmp_path / "params.yaml", prepared, {"train.precision": "fp16"})
    with pytest.raises(ConfigError, match="train.precision = fp16 on the CPU"):
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    assert not (tmp_path / "checkpoints").exists()
