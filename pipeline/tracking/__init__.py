"""MLflow: a run per build job (``runs``) and the table that compares them (``compare``)."""
