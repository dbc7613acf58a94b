"""``tune``: the search for the deployment that meets a latency SLO on a workload at the lowest
cost (candidates, performance model, trials, decision)."""
