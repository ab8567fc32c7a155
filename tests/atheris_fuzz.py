"""Coverage-guided fuzzing (atheris: libFuzzer for Python) of what parses bytes from the network.

``python -m tests.atheris_fuzz TARGET [libFuzzer flags] [CORPUS_DIR...]``, run by
tests/test_atheris.py. Where hypothesis draws from grammars the tests wrote, libFuzzer mutates
bytes towards new branches of the code under test (instrumented here), so it reaches near-misses
nobody wrote a strategy for. The checks are the hypothesis tests' own, one function each:

- ``http1``: the bytes as a (pipelined) request stream: freeze_proxy.http1 frames every message
  it accepts exactly as llhttp and h11 do (tests/test_http1_differential.py).
- ``webhook``: the bytes as an AdmissionReview body: parse_review + review_pod never raise, always
  allow, and a patch applies and keeps a valid pod valid (tests/test_fuzz_webhook.py).

A failing input is written as ``crash-<sha1>`` under ``-artifact_prefix`` and the process exits
non-zero (libFuzzer's own report names the exception).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["freeze_proxy", "webhook"]):
    import freeze_proxy.http1
    import webhook.admission
    import webhook.mutation

from tests.test_fuzz_webhook import check_review, review_counts
from tests.test_http1_differential import check_stream

# Imported first, inside the block, so that their branches guide the fuzzer.
INSTRUMENTED = (freeze_proxy.http1, webhook.admission, webhook.mutation)


_COUNTS = review_counts()


def one_review(data: bytes) -> None:
    check_review(data, False, _COUNTS)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "http1": check_stream,
    "webhook": one_review,
}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    # review_pod logs a traceback for each pod it admits unchanged (its safety net): thousands.
    logging.getLogger("webhook").setLevel(logging.CRITICAL)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
