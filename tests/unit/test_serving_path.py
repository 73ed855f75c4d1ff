"""Startup refusals of serving paths Gyges has not built or verified
(``gyges.core.serving_path``), directly and through SGLang's own argument parsing."""
from __future__ import annotations

import pytest

from gyges.core.serving_path import ServingPath, refusal, resolve_device
from gyges.testing.server import parse_server_args, tiny_model

UNSET = {"--attention-backend": None, "--prefill-attention-backend": None,
         "--decode-attention-backend": None}


def path(device: str = "cpu", cuda_graph: bool = False, **backends: str) -> ServingPath:
    flags = dict(UNSET)
    flags.update({f"--{k.replace('_', '-')}": v for k, v in backends.items()})
    return ServingPath(device, flags, cuda_graph)


@pytest.mark.parametrize("p", [path(), path(attention_backend="triton"),
                               path(attention_backend="torch_native", cuda_graph=True),
                               path(decode_attention_backend="triton")])
def test_verified_cpu_paths_pass(p):
    assert refusal(p) is None


@pytest.mark.parametrize("p, why", [
    (path(attention_backend="flashinfer"), "--attention-backend flashinfer is not verified"),
    (path(prefill_attention_backend="fa3"), "--prefill-attention-backend fa3"),
    (path(decode_attention_backend="intel_amx"), "--decode-attention-backend intel_amx"),
    (path("cuda", cuda_graph=True), "needs --disable-cuda-graph"),
    (path("cuda"), "NCCL device groups are not built"),
    (path("cuda", attention_backend="flashinfer"), "flashinfer is not verified"),
    (path("xpu"), "not 'xpu'"),
])
def test_refusals_are_one_line_and_name_the_way_out(p, why):
    msg = refusal(p)
    assert msg and why in msg and "drop --enable-gyges" in msg and "\n" not in msg, msg


def test_unset_device_follows_cuda():
    assert resolve_device(None, True) == "cuda"
    assert resolve_device(None, False) == "cpu"
    assert resolve_device("cpu", True) == "cpu"


CASES = [
    (["--device", "cpu"], (0, "torch_native", False), None),
    (["--device", "cpu", "--attention-backend", "triton"], (0, "triton", False), None),
    (["--device", "cpu", "--attention-backend", "flashinfer"], 2, "flashinfer is not verified"),
    (["--device", "cpu", "--decode-attention-backend", "fa3"], 2, "fa3 is not verified"),
    (["--device", "cuda"], 2, "needs --disable-cuda-graph"),
    (["--device", "cuda", "--disable-cuda-graph"], 2, "NCCL device groups are not built"),
]


def test_through_sglang_argument_parsing():
    model = str(tiny_model(arch="llama", heads=4, kv_heads=2))
    argvs = [["--model-path", model, "--enable-gyges", "--dp-size", "2", *flags]
             for flags, _, _ in CASES]
    results = parse_server_args(argvs)
    for (flags, want, why), r in zip(CASES, results, strict=True):
        code, err = r["code"], r["stderr"]
        if why is None:
            got = (code, r["attention_backend"], r["disable_overlap_schedule"])
            assert got == want, (flags, err)
        else:
            lines = err.strip().splitlines()
            assert code == want and len(lines) == 1 and why in lines[0], (flags, err)
