"""Pickle a function's code with its real file name, so a task's warnings name the caller's file.

cloudpickle (3.x) writes every code object it pickles by value with the file name
``<dynamic-code>``, to make its pickles the same wherever a function was defined.  A warning
raised on a worker by a function defined in a notebook cell or ``__main__`` then reads
``<dynamic-code>:4`` where a local run names the cell (``/tmp/ipykernel_<pid>/<hash>.py``) or
the script.  Batches keep the real name: the worker only reports it back, it opens nothing.
"""

from __future__ import annotations

import types
from collections import ChainMap
from typing import Any

import cloudpickle

DYNAMIC_FILENAME = "<dynamic-code>"
_code_reduce = cloudpickle.CloudPickler.dispatch_table[types.CodeType]


def _filename_index() -> int | None:
    """Where cloudpickle puts the file name among a code object's constructor arguments
    (None: this cloudpickle keeps the real name)."""
    args = _code_reduce(_filename_index.__code__)[1]
    hits = [i for i, arg in enumerate(args) if arg == DYNAMIC_FILENAME]
    return hits[0] if len(hits) == 1 else None


_FILENAME_INDEX = _filename_index()


def reduce_code(code: types.CodeType) -> Any:
    constructor, args = _code_reduce(code)
    if _FILENAME_INDEX is not None and args[_FILENAME_INDEX] == DYNAMIC_FILENAME:
        args = (*args[:_FILENAME_INDEX], code.co_filename, *args[_FILENAME_INDEX + 1:])
    return constructor, args


DISPATCH_TABLE = ChainMap({types.CodeType: reduce_code}, cloudpickle.CloudPickler.dispatch_table)
