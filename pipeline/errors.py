"""The one exception hierarchy. The CLI prints ``str(error)`` as a single line and exits 1, so every
message names the problem and the fix (usually the override to change)."""


class PipelineError(Exception):
    """A problem the user can fix; never a bug."""


class ConfigError(PipelineError):
    """Bad overrides, unknown options, or a configuration that cannot work."""


class FetchError(PipelineError):
    """The checkpoint could not be obtained (network, auth, missing files, unsafe weights)."""


class StageError(PipelineError):
    """A stage failed for a reason outside the configuration (tool failure, bad artifact)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the main thread is, so every ``finally`` and ``with`` on
    the way out runs as it does for Ctrl-C: servers and builders stopped, the MLflow run closed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
