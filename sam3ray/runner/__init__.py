"""The only package that imports ray: the stage adapter, the pipelines, the job, submit."""
