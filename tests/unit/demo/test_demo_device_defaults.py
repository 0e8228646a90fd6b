"""``kvbridge demo``'s defaults per device: on one GPU a model whose reuse shows, NIXL reading
a host mirror; on the CPU the small model and NIXL's default. The serve configs carry it."""

from __future__ import annotations

from kvbridge.config import TransferConfig
from kvbridge.demo.cli import build_parser, device_defaults
from kvbridge.demo.stack import StackPlan, StackSizes


def _plan(args: object, reuse: bool) -> StackPlan:
    sizes = StackSizes.for_workload(longest_prompt=200, shared_prefix=64, max_tokens=8, users=2)
    return StackPlan(
        "reuse" if reuse else "baseline",
        reuse,
        args.model,  # type: ignore[attr-defined]
        args.device,  # type: ignore[attr-defined]
        0,
        sizes,
        None,
        args.kv_buffer_device,  # type: ignore[attr-defined]
    )


def _nixl_child(config: dict) -> dict:
    transfer = config["kv_transfer_config"]
    if transfer["kv_connector"] == "MultiConnector":
        return transfer["kv_connector_extra_config"]["connectors"][0]
    return transfer


def test_on_cuda_the_demo_takes_llama3_1b_and_a_host_mirror() -> None:
    args = device_defaults(build_parser().parse_args(["--device", "cuda"]))
    assert (args.model, args.kv_buffer_device) == ("llama3-1b", "cpu")
    for reuse in (True, False):
        config = _plan(args, reuse).serve_config("kv_consumer")
        assert _nixl_child(config)["kv_buffer_device"] == "cpu"
        parsed = TransferConfig.from_dict(_nixl_child(config))
        assert parsed.kv_buffer_device == "cpu"


def test_on_cpu_and_when_given_the_choices_stand() -> None:
    args = device_defaults(build_parser().parse_args([]))
    assert (args.model, args.kv_buffer_device) == ("small", None)
    assert "kv_buffer_device" not in _nixl_child(_plan(args, True).serve_config("kv_producer"))
    given = ["--device", "cuda", "--model", "small", "--kv-buffer-device", "cuda"]
    args = device_defaults(build_parser().parse_args(given))
    assert (args.model, args.kv_buffer_device) == ("small", "cuda")
