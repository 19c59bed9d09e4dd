"""Notebook display of result records, registered from above: a record's `_repr_html_` and `plot` ask these two
hooks, and the layer that draws (`reporting.display`, loaded with the Python API `cifarbench.api`) registers a
view per record type. So records and services never import the reporting layer."""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from cifarbench.errors import CifarbenchError


@singledispatch
def html(result: object) -> str | None:
    """`result`'s HTML summary in a notebook; None (the plain repr) where no view is registered."""
    return None


@singledispatch
def figure(result: object, *args: Any, **kwargs: Any) -> Any:
    """`result`'s matplotlib Figure (made to show inline in a notebook)."""
    raise CifarbenchError(f"no figure is registered for {type(result).__name__}; `import cifarbench.api` (what "
                          "`import cifarbench as cb` loads on first use) registers them")
