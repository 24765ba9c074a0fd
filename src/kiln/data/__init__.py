"""Kinds of data, one module each (see :mod:`kiln.data.kind` for the interface they share).

Importing this package registers every kind under the name ``data.dataset`` uses. A new kind of data is a
new module here and one name in the line below.
"""

from kiln.data import (  # noqa: F401  (each registers its kind)
    folders, interactions, mnist, table_stream, tabular, text, text_classes, text_pairs, text_stream,
    timeseries,
)
