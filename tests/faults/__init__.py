"""Fault-injection helpers shared by the fault tests (not tests themselves).

- :mod:`tests.faults.bad_inputs`: every kind of poison file, generated in memory.
- :mod:`tests.faults.s3proxy`: an HTTP proxy in front of moto that answers 503 SlowDown.
- :mod:`tests.faults.jobs`: job configs, output readers and Ray process clean-up.
"""
