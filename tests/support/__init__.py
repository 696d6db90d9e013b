"""Helpers shared by every test tier (not tests themselves).

- :mod:`tests.support.images`: the one scene generator and encoder of test images.
- :mod:`tests.support.jobs`: the one job config, concept tables, output readers, Ray clean-up.
- :mod:`tests.support.lake`: an output built by hand (plan, commit stage, consolidation; fake
  labels, no model, no Ray) over a manifest of hash-named inputs.
- :mod:`tests.support.bad_inputs`: every kind of poison file, generated in memory.
- :mod:`tests.support.s3proxy`: an HTTP proxy in front of moto that answers 503 SlowDown.
- :mod:`tests.support.faults`: fault injection as a wrapper stage (no switches in production).
"""
