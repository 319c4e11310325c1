"""The front's limits without a server: JSON depth scan, in-flight byte budget, request ids, protobuf field access."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from blip2_triton.front import limits
from blip2_triton.front.limits import (
    MAX_JSON_STRUCTURE,
    BudgetExhaustedError,
    ByteBudget,
    JsonLimitError,
    check_json,
    request_id,
)
from blip2_triton.front.wire import WireError, string_fields, submessage_strings, with_string_field

T = TypeVar("T")
ISSUE_20_BODY = b'{"inputs": [' * 100000 + b"]}" * 100000  # crashed tritonserver 2.51 (SIGSEGV)


def reference_depth(body: bytes) -> int:
    """A plain state machine over JSON's string grammar (a backslash escapes the next byte)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        was_escaped, escaped = escaped, byte == 0x5C and not escaped
        if byte == 0x22 and not was_escaped:
            in_string = not in_string
        elif not in_string and byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and byte in b"]}":
            depth -= 1
    return deepest


def scan_depth(body: bytes) -> int:
    buf = np.frombuffer(body, dtype=np.uint8)
    where = limits._structural_positions(buf)
    return limits.json_depth(limits._KIND[buf[where]], where)


def test_issue_20_body_is_refused_with_its_depth() -> None:
    with pytest.raises(JsonLimitError, match=r"expected nesting at most 32 deep, got 200000") as info:
        check_json(ISSUE_20_BODY, 32)
    assert not info.value.too_large


def test_real_request_bodies_pass() -> None:
    kserve = {"id": "a", "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [["x"]]},
                                    {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [[8]]}]}
    chat = {"model": "blip2", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUJD" * 100_000}}]}]}
    for body in (kserve, chat):
        check_json(json.dumps(body).encode(), 8)


def test_brackets_inside_strings_do_not_count() -> None:
    check_json(json.dumps({"text": "[{" * 5000, "quote": 'a "[[[" b', "slash": "\\[[[\\"}).encode(), 3)
    with pytest.raises(JsonLimitError, match="got 4"):
        check_json(b'{"a": "\\\\", "b": [[[1]]]}', 3)  # an escaped backslash does not escape the quote after it


@pytest.mark.parametrize("chunk", [1 << 22, 1, 2, 3, 7])
def test_depth_matches_a_reference_state_machine(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks put chunk boundaries inside backslash runs and strings.
    monkeypatch.setattr(limits, "_CHUNK", chunk)
    rng = random.Random(chunk)
    alphabet = b'[]{}"\\ab,'
    for _ in range(1500):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert scan_depth(body) == reference_depth(body), body


def test_a_body_of_brackets_past_the_structure_bound_is_refused() -> None:
    body = b"[]" * (MAX_JSON_STRUCTURE // 2 + 1)
    with pytest.raises(JsonLimitError, match="brackets, quotes and backslashes") as info:
        check_json(body, 32)
    assert info.value.too_large
    check_json(b"[]" * (MAX_JSON_STRUCTURE // 2), 32)  # at the bound: flat, accepted


def test_unclosed_brackets_count_as_depth() -> None:
    with pytest.raises(JsonLimitError, match="got 40"):
        check_json(b"[" * 40, 32)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_budget_waits_for_room_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100, wait_s=5.0)
        order: list[str] = []
        assert await budget.acquire(80) == 80

        async def take(name: str, nbytes: int) -> None:
            await budget.acquire(nbytes)
            order.append(name)

        first = asyncio.create_task(take("first", 60))
        await asyncio.sleep(0)
        second = asyncio.create_task(take("second", 10))  # fits now, but waits behind the first
        await asyncio.sleep(0.05)
        assert order == [] and budget.in_use == 80
        budget.release(80)
        await asyncio.gather(first, second)
        assert budget.in_use == 70
        return order

    assert run(scenario()) == ["first", "second"]


def test_budget_times_out_and_forgets_the_waiter() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100, wait_s=0.05)
        await budget.acquire(100)
        with pytest.raises(BudgetExhaustedError, match="limit 100"):
            await budget.acquire(1)
        assert not budget._waiters
        budget.release(100)
        assert budget.in_use == 0
        assert await budget.acquire(500) == 100  # larger than the whole budget: takes all of it

    run(scenario())


def test_budget_cancelled_waiter_gives_way() -> None:
    async def scenario() -> None:
        budget = ByteBudget(10, wait_s=5.0)
        await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(10)
        assert budget.in_use == 0 and not budget._waiters

    run(scenario())


@pytest.mark.parametrize(("incoming", "kept"), [("req-1.a:b/c", True), ("a" * 128, True), ("a" * 129, False),
                                                ("has space", False), ("line\nbreak", False), ("", False),
                                                (None, False)])
def test_request_id_keeps_sane_client_ids(incoming: str | None, kept: bool) -> None:
    rid = request_id(incoming)
    assert (rid == incoming) is kept
    if not kept:
        assert len(rid) == 32 and rid.isalnum()


def test_wire_reads_and_sets_model_and_id_like_protobuf() -> None:
    request = pb.ModelInferRequest(model_name="blip2", model_version="1")
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x00" * 300_000)
    request.parameters["p"].int64_param = 7
    raw = request.SerializeToString()
    assert string_fields(raw, frozenset({1, 3})) == {1: "blip2"}
    with_id = with_string_field(raw, 3, "abc")
    parsed = pb.ModelInferRequest.FromString(with_id)
    assert parsed.id == "abc" and parsed.model_name == "blip2"
    assert parsed.raw_input_contents == request.raw_input_contents
    assert string_fields(with_id, frozenset({1, 3})) == {1: "blip2", 3: "abc"}
    # A repeated singular field: the last one wins, as Triton's parser sees it.
    twice = with_string_field(raw, 1, "blip2_llm")
    assert pb.ModelInferRequest.FromString(twice).model_name == "blip2_llm"
    assert string_fields(twice, frozenset({1}))[1] == "blip2_llm"
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    assert submessage_strings(request.SerializeToString(), 5, 1) == ["image", "max_tokens"]


@pytest.mark.parametrize("raw", [b"\x0a\x10abc", b"\x0a", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"])
def test_wire_refuses_malformed_messages(raw: bytes) -> None:
    with pytest.raises(WireError):
        string_fields(raw, frozenset({1}))
