class InvalidRequestError(ValueError):
    """A request the server cannot serve as sent; the message goes back to the client verbatim."""


class ConfigurationError(RuntimeError):
    """Server options or the checkpoint are unusable; raised at load time, never per request."""
