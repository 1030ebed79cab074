"""The ``dapt`` subcommands, one module each (``dapt.cli`` dispatches to them).

Every command composes Hydra configs whose groups extend a registered schema
(``dapt.pipeline.schemas``), so importing this package registers them first.
"""

from dapt.pipeline.schemas import register_schemas

register_schemas()
