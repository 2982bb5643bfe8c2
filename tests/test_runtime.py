"""Device and precision resolution: `auto` picks what is fast on this machine, explicit choices are honoured."""

import warnings

import pytest
import torch

from gptexp.errors import GptexpError
from gptexp.runtime import native_bf16, resolve_precision, resolve_runtime

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_in_hardware():
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")


def test_explicit_bf16_on_a_cpu_without_bf16_hardware_warns_that_it_is_the_slow_path():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", CPU) == "bf16"
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "without bf16 hardware" in str(w.message)]
    assert len(slow) == (0 if native_bf16(CPU) else 1)


def test_fp32_never_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32", CPU) == "fp32"


def test_fp16_on_cpu_and_a_missing_cuda_device_are_one_line_errors():
    with pytest.raises(GptexpError, match="fp16 needs CUDA"):
        resolve_precision("fp16", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(GptexpError, match="CUDA is not available"):
            resolve_runtime("cuda", "fp32", 1)


def test_the_cli_prints_gptexp_warnings_as_one_line_once(capsys):
    from gptexp import runtime
    from gptexp.cli import _one_line_warnings

    passed_on = []
    show = _one_line_warnings(lambda *args: passed_on.append(args))
    for _ in range(2):
        show(RuntimeWarning("bf16 is slow here"), RuntimeWarning, runtime.__file__, 50)
    show(UserWarning("from elsewhere"), UserWarning, "/somewhere/else.py", 1)
    assert capsys.readouterr().err == "gptexp: warning: bf16 is slow here\n"
    assert len(passed_on) == 1  # other libraries' warnings keep Python's own format
