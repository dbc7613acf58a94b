"""Serving a rendered repository: Triton processes here (``server``), Kubernetes objects for a
cluster (``kubernetes``)."""
