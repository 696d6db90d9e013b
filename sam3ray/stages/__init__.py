"""Ray-free stages: segment (images; its image reader in ``decode``), track (videos), commit.

Each has declared resources, ``setup()`` once and ``process(task)``; the runner
turns them into Ray Data operators, and users' own code can call them directly.
"""
