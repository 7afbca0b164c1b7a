"""The serving benchmark's V2 rows: their bodies, headers and paths, the response check, wrk's Lua script,
the V2 goal lines and the V2-beside-v1 table.

Bodies are read back with the service's own V2 reader and responses written with its own writer
(`service.v2_binary`), so the benchmark and the server agree on the wire format; no server and no wrk.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from bench.serve_load import Load, Paired, lua_string, wrk_script
from bench.serve_pairs import CEILING, Side, comparisons
from bench.serve_report import goals, v2_table
from bench.serve_scenarios import (
    HEADER_LENGTH,
    REQUESTS,
    SERVERS,
    V1_REQUESTS,
    V2_PAIRS,
    V2_REQUESTS,
    Scenario,
    scenarios,
)
from bench.serve_sweep import Point, ServerRun, check_response
from service.manifest import Manifest
from service.responses import encoding_record, npy_bytes
from service.v2_binary import Signature, read_request, write_response
from service.v2_operations import OPERATIONS

SCENARIOS = scenarios(784, (1, 28, 28))
MANIFEST = cast(Manifest, SimpleNamespace(input_shape=(1, 28, 28), latent_dim=32, value_range=(0.0, 1.0)))


def signature(operation: str) -> Signature:
    """The signature the service reads `m.OPERATION` requests against (the fashion-mnist-mlp sizes)."""
    return OPERATIONS[operation].signature(f"m.{operation}", MANIFEST, 256)


def header_length(scenario: Scenario) -> str | None:
    return scenario.headers.get(HEADER_LENGTH)


def bench_args(servers: list[str], requests: list[str], concurrency: list[int]) -> argparse.Namespace:
    return argparse.Namespace(servers=servers, requests=requests, concurrency=concurrency)


def load(rps: float = 100.0, p50_ms: float = 10.0, p99_ms: float = 20.0) -> Load:
    return Load(int(rps * 5), 5.0, http_errors=0, socket_errors=0, p50_ms=p50_ms, p99_ms=p99_ms)


def point(key: str, connections: int, rps: float = 100.0) -> Point:
    return Point(SCENARIOS[key], connections, load(rps), cpu_s=1.0, merged=None, response_bytes=100)


# --- requests -------------------------------------------------------------------------------------------


def test_the_v2_requests_follow_issue_5s_and_only_the_service_with_batching_on_sends_them() -> None:
    assert REQUESTS == V1_REQUESTS + V2_REQUESTS
    assert list(SCENARIOS) == [*REQUESTS, "noop"]
    assert SERVERS["service"].scenarios == REQUESTS
    assert SERVERS["service-nobatch"].scenarios == V1_REQUESTS
    assert {key for pair in V2_PAIRS for key in pair} <= set(REQUESTS)


def test_paths_and_headers() -> None:
    assert SCENARIOS["sample1"].path("m") == "/v1/models/m/sample"
    assert SCENARIOS["sample1"].headers == {"Content-Type": "application/json"}
    assert SCENARIOS["sample256-npy"].headers == {
        "Content-Type": "application/json",
        "Accept": "application/x-npy",
    }
    assert SCENARIOS["encode256-npy"].path("m") == "/v1/models/m/encode"
    assert SCENARIOS["encode256-npy"].headers == {
        "Content-Type": "application/x-npy",
        "Accept": "application/x-npy",
    }
    assert SCENARIOS["v2-sample1-json"].path("m") == "/v2/models/m.sample/infer"
    assert SCENARIOS["v2-sample1-json"].headers == {"Content-Type": "application/json"}
    for key, operation in (("v2-sample256-bin", "sample"), ("v2-encode256-bin", "encode")):
        scenario = SCENARIOS[key]
        assert scenario.path("fashion-mnist-mlp") == f"/v2/models/fashion-mnist-mlp.{operation}/infer"
        length = int(scenario.headers[HEADER_LENGTH])
        assert scenario.headers["Content-Type"] == "application/octet-stream"
        assert json.loads(scenario.body[:length])["inputs"] is not None  # the JSON part is that long
        assert scenario.body[length - 1 : length] == b"}"


def test_v2_sample1_json_is_read_as_v1s_n1_with_json_outputs() -> None:
    scenario = SCENARIOS["v2-sample1-json"]
    assert header_length(scenario) is None
    decoded = read_request(scenario.body, None, signature("sample"))
    assert (decoded.params.model_dump()["n"], decoded.params.model_dump()["seed"]) == (1, 1)
    assert decoded.tensors == {}
    assert decoded.outputs == (("samples", False), ("z", False))
    assert json.loads(SCENARIOS["sample1"].body) == {"n": 1, "seed": 1}


def test_v2_sample256_binary_asks_for_the_images_as_binary_data() -> None:
    scenario = SCENARIOS["v2-sample256-bin"]
    length = header_length(scenario)
    assert length is not None and int(length) == len(scenario.body)  # no inputs: nothing after the JSON
    decoded = read_request(scenario.body, length, signature("sample"))
    assert decoded.params.model_dump()["n"] == 256
    assert decoded.outputs == (("samples", True),)  # images only, as the .npy path returns
    assert (scenario.rows, scenario.graph, scenario.batch) == (256, "decoder", 256)


def test_v2_encode256_binary_carries_the_same_images_as_the_v1_npy_request() -> None:
    scenario = SCENARIOS["v2-encode256-bin"]
    decoded = read_request(scenario.body, header_length(scenario), signature("encode"))
    images = decoded.tensors["images"]
    assert images.shape == (256, 1, 28, 28) and images.dtype == np.float32
    pixels = np.load(io.BytesIO(SCENARIOS["encode256-npy"].body), allow_pickle=False)
    assert pixels.shape == (256, 1, 28, 28) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(images, pixels / np.float32(255))
    assert decoded.outputs == tuple((name, True) for name in ("mu", "logvar", "sigma", "z"))
    assert (scenario.rows, scenario.graph, scenario.batch) == (256, "encoder", 256)


# --- the response check ---------------------------------------------------------------------------------


def v2_answer(
    outputs: list[tuple[str, np.ndarray[Any, Any], bool]],
) -> tuple[bytes, dict[str, str]]:
    """A V2 response body as the service writes it, and its headers (names in lower case)."""
    body, length = write_response({"model_name": "m.x", "model_version": "1"}, outputs)
    return body, {} if length is None else {HEADER_LENGTH.lower(): str(length)}


def images(n: int, dtype: type = np.float32) -> np.ndarray[Any, Any]:
    return np.zeros((n, 1, 28, 28), dtype)


def test_check_response_accepts_what_the_service_writes() -> None:
    check_response(SCENARIOS["v2-sample256-bin"], *v2_answer([("samples", images(256), True)]))
    check_response(
        SCENARIOS["v2-sample1-json"],
        *v2_answer([("samples", images(1), False), ("z", np.zeros((1, 32), np.float32), False)]),
    )
    latents = np.zeros((256, 32), np.float32)
    encoded = [(name, latents, True) for name in ("mu", "logvar", "sigma")]
    check_response(
        SCENARIOS["v2-encode256-bin"], *v2_answer([*encoded, ("z", np.zeros((256, 0, 32), np.float32), True)])
    )
    encoding = SimpleNamespace(mu=latents, logvar=latents, sigma=latents, z=None)
    check_response(SCENARIOS["encode256-npy"], npy_bytes(encoding_record(cast(Any, encoding))))
    check_response(SCENARIOS["sample1"], json.dumps({"samples": [[0.0]], "z": [[0.0]], "seed": 1}).encode())


def test_check_response_refuses_the_wrong_number_of_rows() -> None:
    with pytest.raises(RuntimeError, match="V2 sample n=256 binary: expected 256 rows, got 255"):
        check_response(SCENARIOS["v2-sample256-bin"], *v2_answer([("samples", images(255), True)]))
    latents = np.zeros((64, 32), np.float32)
    with pytest.raises(RuntimeError, match="expected 256 rows, got 64"):
        check_response(SCENARIOS["v2-encode256-bin"], *v2_answer([("mu", latents, True)]))


def test_check_response_refuses_json_where_binary_data_was_asked() -> None:
    body, headers = v2_answer([("samples", images(256), False)])
    with pytest.raises(RuntimeError, match="outputs are not binary data"):
        check_response(SCENARIOS["v2-sample256-bin"], body, headers)
    mixed, mixed_headers = v2_answer([("samples", images(256), False), ("z", np.zeros((256, 32)), True)])
    with pytest.raises(RuntimeError, match="output samples is JSON, not binary data"):
        check_response(SCENARIOS["v2-sample256-bin"], mixed, mixed_headers)


@pytest.mark.parametrize(
    "damage",
    [
        lambda body, headers: (body[:-1], headers),  # a byte short
        lambda body, headers: (body + b"\0", headers),  # a byte over
        lambda body, headers: (body, {HEADER_LENGTH.lower(): str(len(body) + 1)}),
        lambda body, headers: (body, {HEADER_LENGTH.lower(): "0"}),
        lambda body, headers: (body, {HEADER_LENGTH.lower(): "12"}),  # not the JSON's length
    ],
    ids=["short", "long", "header-past-end", "header-zero", "header-wrong"],
)
def test_check_response_refuses_a_broken_binary_body(damage: Any) -> None:
    body, headers = v2_answer([("samples", images(256, np.uint8), True)])
    with pytest.raises(RuntimeError, match="unexpected response"):
        check_response(SCENARIOS["v2-sample256-bin"], *damage(body, headers))


def test_check_response_refuses_another_status_and_an_error_body() -> None:
    with pytest.raises(RuntimeError, match="status 503"):
        check_response(SCENARIOS["v2-sample1-json"], b'{"error": "busy"}', {}, 503)
    with pytest.raises(RuntimeError, match="unexpected response"):
        check_response(SCENARIOS["v2-sample1-json"], b'{"error": "unknown model"}', {}, 200)


# --- wrk's script ---------------------------------------------------------------------------------------


def test_wrk_script_sets_each_requests_headers() -> None:
    script = wrk_script("/tmp/x/body", SCENARIOS["v2-encode256-bin"].headers)
    length = SCENARIOS["v2-encode256-bin"].headers[HEADER_LENGTH]
    assert 'local f = assert(io.open("/tmp/x/body", "rb"))' in script
    assert 'wrk.headers["Content-Type"] = "application/octet-stream"' in script
    assert f'wrk.headers["Inference-Header-Content-Length"] = "{length}"' in script
    assert "Accept" not in script
    assert "WRK_RESULT" in script


def test_lua_strings_escape_and_refuse_what_a_header_cannot_hold() -> None:
    assert lua_string('a "b" \\c') == '"a \\"b\\" \\\\c"'
    with pytest.raises(ValueError, match="printable"):
        lua_string("a\nb")
    with pytest.raises(ValueError, match="header name"):
        wrk_script("/tmp/body", {"Bad Name": "x"})


# --- goals ----------------------------------------------------------------------------------------------


def service_run(concurrency: tuple[int, ...] = (1, 64)) -> ServerRun:
    run = ServerRun(SERVERS["service"], rss_warm=200 * 2**20, rss_end=200 * 2**20)
    run.points = [point(key, c, 100.0 + c) for key in REQUESTS for c in concurrency]
    return run


def test_v2_comparisons_are_planned_after_issue_5s() -> None:
    args = bench_args(list(SERVERS), list(REQUESTS), [1, 64])
    planned = comparisons(args, {"service": service_run()}, SCENARIOS)
    v2 = [p for p in planned if "V2" in p.text or p.a.request == "encode256-npy"]
    assert [(p.a, p.b, p.goal) for p in v2] == [
        (Side("service", "encode256-npy", 64, True), Side(CEILING, "encode256-npy", 0, True), None),
        (Side("service", "v2-sample256-bin", 64, True), Side(CEILING, "v2-sample256-bin", 0, True), 0.70),
        (Side("service", "v2-encode256-bin", 64, True), Side(CEILING, "v2-encode256-bin", 0, True), 0.70),
        (Side("service", "v2-sample1-json", 64), Side("service", "sample1", 64), 0.85),
        (Side("service", "v2-sample1-json", 1), Side("service", "sample1", 1), 0.85),
    ]
    assert planned.index(v2[0]) > max(i for i, p in enumerate(planned) if p.b.server == "service-nobatch")
    assert not any(p.a.request in V2_REQUESTS and p.b.server == "service-nobatch" for p in planned)
    assert all(p.missing is None for p in planned)


def test_v2_goal_lines_pass_fail_and_inform() -> None:
    args = bench_args(["service"], list(REQUESTS), [1, 64])
    runs = {"service": service_run()}
    ratios = {
        "encode256-npy": (0.74, 1.0),
        "v2-sample256-bin": (0.71, 1.0),
        "v2-encode256-bin": (0.69, 1.0),
    }
    pairs = []
    for pair in comparisons(args, runs, SCENARIOS):
        if pair.a.request in ratios:
            pairs.append(replace(pair, result=Paired((ratios[pair.a.request][0],), (1.0,))))
        elif pair.a.request == "v2-sample1-json":
            rps = (4300.0, 4900.0) if pair.a.connections == 64 else (1100.0, 1200.0)
            pairs.append(replace(pair, result=Paired(((rps[0]),), (rps[1],))))
        else:
            pairs.append(pair)
    lines = goals(args, runs, pairs)
    for expected in (
        "INFO  encode 256 uint8 .npy, c=64 (the sweep's best): service / in-process encoder at batch 256 "
        "(images/s): 74%, median of 74%-74% over 1 rounds (no goal)",
        "PASS  V2 sample n=256 binary, c=64 (the sweep's best): service / in-process decoder at batch 256 "
        "(samples/s): 71%, median of 71%-71% over 1 rounds (goal >= 70%)",
        "FAIL  V2 encode 256 UINT8 binary, c=64 (the sweep's best): service / in-process encoder at batch "
        "256 (images/s): 69%, median of 69%-69% over 1 rounds (goal >= 70%)",
        "PASS  sample n=1, c=64: V2 JSON / v1 (req/s): 88%, median of 88%-88% over 1 rounds (goal >= 85%)",
        "PASS  sample n=1, c=1: V2 JSON / v1 (req/s): 92%, median of 92%-92% over 1 rounds (goal >= 85%)",
        "PASS  side by side: 0 HTTP and socket errors (goal 0)",
    ):
        assert expected in lines, "\n".join(lines)


def test_v2_goal_lines_skip_with_the_reason() -> None:
    args = bench_args(["service"], list(V1_REQUESTS), [1, 64])
    runs = {"service": service_run()}
    runs["service"].points = [p for p in runs["service"].points if p.scenario.key in V1_REQUESTS]
    lines = goals(args, runs, comparisons(args, runs, SCENARIOS))
    assert (
        "SKIP  sample n=1, c=64: V2 JSON / v1 (req/s) (goal >= 85%): v2-sample1-json not in --requests"
        in (lines)
    )
    assert (
        "SKIP  V2 sample n=256 binary, the sweep's best c: service / in-process decoder at batch 256 "
        "(samples/s) (goal >= 70%): v2-sample256-bin not in --requests"
    ) in lines
    nothing = bench_args([], [], [])
    assert all(line.startswith("SKIP") for line in goals(nothing, {}, comparisons(nothing, {}, SCENARIOS)))


# --- the V2-beside-v1 table -----------------------------------------------------------------------------


def test_v2_table_puts_each_v2_point_beside_its_v1_point() -> None:
    run = ServerRun(SERVERS["service"])
    run.points = [
        point("sample1", 1, 1000.0),
        point("sample1", 64, 5000.0),
        point("v2-sample1-json", 64, 4500.0),  # no c=1 point: no c=1 row
        point("sample256-npy", 32, 250.0),
        point("v2-sample256-bin", 32, 200.0),
    ]
    ceiling = {("decoder", 1): 20000.0, ("decoder", 256): 80000.0}
    table = v2_table({"service": run}, ceiling)
    assert table[1] == "## V2 beside v1"
    rows = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| sample n=1 | V2 sample n=1 JSON | 64 | 5,000 | 4,500 | 90% | 10.00 / 20.00 | 10.00 / 20.00 | - / - |",
        "| sample n=256 .npy | V2 sample n=256 binary | 32 | 250 | 200 | 80% | 10.00 / 20.00 | "
        "10.00 / 20.00 | 80% / 64% |",
    ]
    assert v2_table({}, ceiling) == []
    assert v2_table({"service": ServerRun(SERVERS["service"], points=run.points[:2])}, ceiling) == []
