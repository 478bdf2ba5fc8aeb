"""What the fuzz harnesses (fuzz_pickle.py, fuzz_import.py) share: the limits
an input runs under, the Finding exception, the address-space cap and the
per-input timeout."""

from __future__ import annotations

import os
import resource

ADDRESS_SPACE = 6 << 30  # a memory bomb fails as MemoryError under this cap
TIMEOUT_S = 20
MAX_INPUT = 1 << 20  # mutants stay below 1 MiB
#: Values a length or count field is set to.
EXTREMES = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1]


class Finding(BaseException):
    """A bug. A BaseException, so that no `except Exception` in the code
    under test can swallow it (the timeout raises it from a signal handler)."""


def cap_address_space() -> None:
    # Not under AddressSanitizer (.ci/asan preloads it): its shadow memory
    # counts against RLIMIT_AS, and its allocator refuses absurd sizes itself
    # (allocator_may_return_null=1 there), which the checks still report.
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def on_timeout(signum, frame):
    """SIGALRM handler: an input ran past TIMEOUT_S."""
    raise Finding(f"an input took more than {TIMEOUT_S} s")
