"""triton_repo: the Triton model repository (``stage``), rendered from ``model_repo/`` (``render``)."""
