"""The UCX settings a worker that registers VRAM defaults before it makes its agent."""

from __future__ import annotations

from kvbridge.nixl.transport_factory import VRAM_UCX_DEFAULTS, apply_ucx_defaults


def test_vram_on_ucx_turns_cuda_ipc_get_on() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    applied = apply_ucx_defaults("VRAM", ("UCX",), env)
    assert applied == {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"} == VRAM_UCX_DEFAULTS
    assert env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y" and env["PATH"] == "/bin"


def test_an_operators_value_wins() -> None:
    env = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "n"}
    assert apply_ucx_defaults("VRAM", ("UCX",), env) == {}
    assert env == {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "n"}


def test_host_memory_or_another_backend_leaves_the_environment_alone() -> None:
    for memory, backends in (("DRAM", ("UCX",)), ("VRAM", ("GDS",))):
        env: dict[str, str] = {}
        assert apply_ucx_defaults(memory, backends, env) == {}
        assert env == {}
