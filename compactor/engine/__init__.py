"""The engine: masks -> heads -> graph -> plan -> rebuild -> verify, each a module (``plan`` a package).

``compactor.api.compact`` strings these stages together; nothing here reads or writes files.
"""
