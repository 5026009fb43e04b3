"""Errors a caller can act on, raised before any tensor work starts.

Each carries a message meant for the person who sent the request, so the CLI,
the gRPC router and the HTTP app can show it as is (INVALID_ARGUMENT / 400,
NOT_FOUND / 404) instead of a traceback from deep inside torch.
"""


class SpecfleetError(Exception):
    """Base of every error specfleet raises on purpose."""


class InvalidRequest(SpecfleetError, ValueError):
    """The request itself is wrong: empty prompt, bad sampling values, too long."""


class ModelNotFound(SpecfleetError, LookupError):
    """A model path or name that does not resolve to a usable checkpoint."""


class IncompatibleModels(SpecfleetError, ValueError):
    """Two models that cannot be paired, e.g. drafter and target vocabularies differ."""


class DrafterUnavailable(SpecfleetError):
    """The drafter cannot serve (dead actor, timeout): callers fall back to plain decoding."""


class CapacityExhausted(SpecfleetError):
    """Every sequence slot of a model replica is taken: retry later (RESOURCE_EXHAUSTED / 429)."""
