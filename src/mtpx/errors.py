"""Errors that name the problem; the CLI and server turn them into one clear line / a 4xx."""


class MtpxError(Exception):
    """Base class for errors mtpx reports to users."""


class ModelLoadError(MtpxError):
    """A checkpoint could not be loaded: missing file, broken JSON, wrong tensor, unsupported config."""


class RequestError(MtpxError, ValueError):
    """A generation request is invalid (bad parameter value, prompt too long, ...)."""


class RankLost(MtpxError, RuntimeError):
    """A rank of a model run over several processes is gone (its process exited, or a collective failed)."""
