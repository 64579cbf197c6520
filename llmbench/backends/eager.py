"""eager: the model as transformers builds it, decoded by generate()."""

from llmbench.backends.base import Backend


class EagerBackend(Backend):
    name = "eager"
