"""The webhook's AdmissionReview handling under hostile input: mutated Knative pods and envelopes.

Pods are the shapes of tests/knative_pods.py with fields dropped, replaced by wrong types, huge
values or unicode. Through parse_review + review_pod, whatever the pod: no exception escapes, the
pod is always allowed (failurePolicy Ignore semantics: a pod we cannot handle is admitted
unchanged, with a warning), the patch is a JSON patch that applies, and when the pod was valid
before it is still valid after (kubernetes-validate, as tests/test_mutation.py checks).
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz_budget import Cases, budget, run_fuzz
from tests.knative_pods import knative_pod
from tests.reliability_report import write_figure
from tests.test_mutation import SETTINGS, apply_patch, validate
from webhook.admission import BadReview, parse_review, review_pod

pytestmark = pytest.mark.fuzz

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.just("é" * 10_000),  # huge unicode
    st.just([]),
    st.just({}),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in ``doc`` (dict keys and list indexes)."""
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def mutated_pod(draw: st.DrawFn) -> dict[str, Any]:
    pod = knative_pod()
    for _ in range(draw(st.integers(0, 4))):
        paths = [p for p in _paths(pod) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = pod
        for step in path[:-1]:
            parent = parent[step]
        what = draw(st.sampled_from(["drop", "junk", "junk", "dup"]))
        if what == "drop":
            del parent[path[-1]]
        elif what == "junk":
            parent[path[-1]] = draw(JUNK)
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return pod


@st.composite
def review(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A raw review and whether its pod is the untouched valid one."""
    pod = draw(st.one_of(mutated_pod(), st.just(knative_pod())))
    request: dict[str, Any] = {
        "uid": draw(st.sampled_from(["u-1"] * 8 + ["", None, 7])),
        "kind": draw(st.sampled_from([{"group": "", "version": "v1", "kind": "Pod"}] * 8 + [{}])),
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": draw(st.sampled_from(["CREATE"] * 6 + ["UPDATE", "DELETE", 3])),
        "namespace": draw(st.sampled_from(["shop", "", None, "ü" * 300])),
        "object": pod,
    }
    envelope = {
        "apiVersion": draw(
            st.sampled_from(["admission.k8s.io/v1"] * 4 + ["admission.k8s.io/v1beta1", "v2"])
        ),
        "kind": draw(st.sampled_from(["AdmissionReview"] * 6 + ["Pod"])),
        "request": request,
    }
    raw = json.dumps(envelope).encode()
    if draw(st.integers(0, 20)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    return raw, pod == knative_pod()


# The untouched Knative pod in a well-formed review: the example every run includes.
PRISTINE = (
    json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": "shop",
                "object": knative_pod(),
            },
        }
    ).encode(),
    True,
)


def check_review(raw: bytes, pristine: bool, counts: dict[str, int]) -> None:
    """One review through parse_review + review_pod, as webhook.app handles it: the checks
    the hypothesis test below and the atheris run (tests/atheris_fuzz.py) share."""
    try:
        parsed = parse_review(raw)
    except BadReview:
        counts["bad_review"] += 1  # answered 400 by webhook.app: the API server Ignores
        return
    outcome = review_pod(parsed, SETTINGS)
    body = json.loads(json.dumps(outcome.body))  # what goes on the wire is JSON
    response = body["response"]
    assert response["allowed"] is True
    assert response["uid"] == parsed["request"]["uid"]
    if outcome.action == "error":
        counts["errors"] += 1
    if "patch" not in response:
        return
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert isinstance(patch, list) and all(op["op"] in ("add", "replace") for op in patch)
    pod = parsed["request"]["object"]
    try:
        validate(pod)
    except (kubernetes_validate.ValidationError, KeyError, TypeError, AttributeError):
        # The API server validates a pod after the webhooks; it never sends one without
        # metadata, kind or apiVersion. Such a pod stays as invalid as it came.
        counts["invalid_pods"] += 1
        return
    after = apply_patch(pod, patch)
    counts["patched"] += 1
    validate(after)
    assert pristine or after != pod


def review_counts() -> dict[str, int]:
    return {"patched": 0, "errors": 0, "bad_review": 0, "invalid_pods": 0}


def test_no_review_raises_refuses_a_pod_or_gets_an_invalid_patch() -> None:
    cases = Cases()
    mutated = review_counts()

    @budget(150)
    @given(review())
    @example(PRISTINE)  # whatever the draw, one review is patched (the last assertion below)
    def check(item: tuple[bytes, bool]) -> None:
        cases()
        check_review(*item, mutated)

    run_fuzz("webhook_review", cases, check)
    write_figure("webhook_review", fuzz="webhook_review", cases=cases.n, failures=0, **mutated)
    assert mutated["patched"] > 0, mutated
