"""Peak memory of the measuring process, shared by the benchmarks that report it.

Not ``ru_maxrss``: Linux carries the parent's peak over fork and exec into the
child, so a child started by a parent that built 10^7 URIs would report the
parent's 2 GB. ``VmHWM`` belongs to the process's own address space.
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MiB, rounded to 0.1."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:  # not Linux: the rusage figure is the best there is
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
