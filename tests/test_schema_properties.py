"""Property tests of fast-path schema validation over random TensorDicts:
requests that match a request_spec round-trip exactly; requests that do not
get a clear error naming the key, and the server keeps serving."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from batchserve import InferenceServer, ThreadingTransport

_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8,
           torch.bool]
_KEYS = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
_SHAPES = st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3).map(tuple)


@st.composite
def specs(draw) -> dict:
    """key -> (dtype, shape) for 1..4 leaves."""
    keys = draw(st.lists(_KEYS, min_size=1, max_size=4, unique=True))
    return {k: (draw(st.sampled_from(_DTYPES)), draw(_SHAPES)) for k in keys}


def random_leaf(dtype: torch.dtype, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def request_of(spec: dict, seed: int) -> TensorDict:
    return TensorDict({k: random_leaf(d, s, seed + i)
                       for i, (k, (d, s)) in enumerate(spec.items())})


def served(spec: dict, requests: list, bad=None):
    """Results of `requests` on a server with `spec` as request_spec, and the
    error `bad` (if given) raised at submission."""
    transport = ThreadingTransport(request_spec=request_of(spec, 0))
    with InferenceServer(lambda td: td, transport, max_batch_size=4,
                         policy_version_key=None) as server:
        client = transport.client()
        error = None
        futures = [client.submit(td) for td in requests[:2]]
        if bad is not None:
            with pytest.raises((KeyError, ValueError)) as info:
                client(bad)
            error = info.value
        futures += [client.submit(td) for td in requests[2:]]
        results = [f.result(timeout=30) for f in futures]
        assert server.stats()["fast_path_requests"] == len(requests)
    return results, error


@_settings
@given(spec=specs(), seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_requests_matching_the_spec_round_trip_exactly(spec, seeds):
    requests = [request_of(spec, s) for s in seeds]
    results, _ = served(spec, requests)
    for td, result in zip(requests, results):
        assert set(result.keys()) == set(spec)
        for key in spec:
            assert result[key].dtype == td[key].dtype
            assert result[key].shape == td[key].shape
            assert torch.equal(result[key], td[key])


@st.composite
def spec_and_mismatch(draw):
    """A spec, a key of it, and how a request breaks it there."""
    spec = draw(specs())
    key = draw(st.sampled_from(sorted(spec)))
    dtype, shape = spec[key]
    kind = draw(st.sampled_from(["dtype", "shape", "missing"]))
    if kind == "dtype":
        other = draw(st.sampled_from([d for d in _DTYPES if d is not dtype]))
        return spec, key, kind, (other, shape)
    if kind == "shape":
        other = draw(_SHAPES.filter(lambda s: s != shape))
        return spec, key, kind, (dtype, other)
    return spec, key, kind, None


@_settings
@given(case=spec_and_mismatch(), seed=st.integers(0, 10_000))
def test_requests_breaking_the_spec_raise_naming_the_key(case, seed):
    spec, key, kind, replacement = case
    bad = request_of(spec, seed)
    if replacement is None:
        del bad[key]
    else:
        bad[key] = random_leaf(*replacement, seed)
    good = [request_of(spec, seed + 1 + i) for i in range(4)]
    results, error = served(spec, good, bad)
    assert isinstance(error, KeyError if kind == "missing" else ValueError)
    assert repr(key) in str(error)
    if kind != "missing":
        assert kind in str(error)
    for td, result in zip(good, results):  # the others were served, exactly
        for k in spec:
            assert torch.equal(result[k], td[k])
