"""AdmissionReview (admission.k8s.io/v1 and v1beta1) in, AdmissionReview out.

Error policy, deliberately asymmetric:

* A request that is not a well-formed AdmissionReview for a Pod is the caller's mistake (or a
  misconfigured MutatingWebhookConfiguration) and gets HTTP 400 with a reason: there is no ``uid``
  to answer to, and the API server applies the webhook's failurePolicy.
* Anything that goes wrong while computing the patch is *our* bug. The answer is then
  ``allowed: true`` with no patch, a warning the user sees in kubectl, and an error log line: a
  bug in an optional add-on must never block a user's pod (the app simply runs unfrozen).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.mutation import MutationResult, MutationSettings, mutate

log = logging.getLogger("webhook.admission")

VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

Mutator = Callable[[Mapping[str, Any], MutationSettings], MutationResult]


class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer: HTTP 400."""


@dataclass(frozen=True)
class Outcome:
    """The response body and what was done, for the log line."""

    body: dict[str, Any]
    pod: str
    action: str
    reason: str
    warnings: list[str] = field(default_factory=list)


def parse_review(raw: bytes) -> dict[str, Any]:
    """Decode and check the envelope; raise BadReview naming what is wrong."""
    try:
        review = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadReview(f"body is not JSON: {err}") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    if review.get("kind") != "AdmissionReview":
        raise BadReview(f"kind is {review.get('kind')!r}, want 'AdmissionReview'")
    if review.get("apiVersion") not in VERSIONS:
        raise BadReview(f"apiVersion {review.get('apiVersion')!r} is not one of {VERSIONS}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid is missing")
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("kind")) != ("", "Pod"):
        raise BadReview(f"request.kind is {kind!r}: this webhook only handles core Pods")
    resource = request.get("resource")
    if isinstance(resource, dict) and resource.get("resource") not in (None, "pods"):
        raise BadReview(f"request.resource is {resource!r}: only pods")
    if request.get("subResource"):
        raise BadReview(f"subresource {request['subResource']!r} is not handled")
    obj = request.get("object")
    if request.get("operation", "CREATE") == "CREATE" and not isinstance(obj, dict):
        raise BadReview("request.object is not a Pod object")
    if isinstance(obj, dict) and obj.get("kind", "Pod") != "Pod":
        raise BadReview(f"request.object.kind is {obj.get('kind')!r}, want 'Pod'")
    return review


def pod_name(request: Mapping[str, Any]) -> str:
    """namespace/name, or namespace/generateName* for pods not yet named (the usual case)."""
    obj = request.get("object")
    obj = obj if isinstance(obj, dict) else {}
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    namespace = request.get("namespace") or meta.get("namespace") or ""
    name = request.get("name") or meta.get("name")
    if not name:
        name = f"{meta.get('generateName') or ''}*"
    return f"{namespace}/{name}"


def _response(
    review: Mapping[str, Any], patch: list[dict[str, Any]], warnings: list[str]
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()
        ).decode()
    if warnings:
        response["warnings"] = warnings
    # Answer in the version we were asked in: the API server decodes it with that scheme.
    return {"apiVersion": review["apiVersion"], "kind": "AdmissionReview", "response": response}


def review_pod(
    review: Mapping[str, Any], settings: MutationSettings, mutator: Mutator = mutate
) -> Outcome:
    """Answer a parsed AdmissionReview; never raises for the content of the Pod."""
    request = review["request"]
    name = pod_name(request)
    operation = request.get("operation", "CREATE")
    if operation != "CREATE":
        return Outcome(_response(review, [], []), name, "skipped", f"operation {operation}")
    # dryRun needs no special case: the mutation has no side effects (sideEffects: None).
    try:
        result = mutator(request["object"], settings)
    except Exception as err:
        log.exception(
            "mutation failed; admitting pod unchanged", extra={"pod": name, "action": "error"}
        )
        warning = (
            f"freeze-proxy webhook could not process this pod ({type(err).__name__}: {err}); "
            "it was admitted unchanged and will not be frozen"
        )
        return Outcome(_response(review, [], [warning]), name, "error", str(err), [warning])
    return Outcome(
        _response(review, result.patch, result.warnings),
        name,
        result.action,
        result.reason,
        list(result.warnings),
    )
