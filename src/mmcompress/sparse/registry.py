"""Registry of sparse modules that artifacts may contain (filled by ``mmcompress.sparse``)."""

SPARSE_MODULES: dict[str, type] = {}


def register_sparse_module(cls):
    SPARSE_MODULES[cls.__name__] = cls
    return cls
