"""benchmark: load points against Triton (``stage``), the load generator (``loadgen``), prompts
(``workload``) and tables and plot (``report``)."""
