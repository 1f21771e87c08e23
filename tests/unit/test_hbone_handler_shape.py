"""HboneServer tells socket-returning handlers (req) from stream handlers (req, pending) by their arity."""
import functools

import pytest

from mesh.hbone.server import _takes_two_args


async def _one(req):
    return None


async def _two(req, pending):
    return None


async def _two_with_default(req, pending=None):
    return None


async def _varargs(*args):
    return None


async def _kwonly(req, *, pending=None):
    return None


class _Method:
    async def one(self, req):
        return None

    async def two(self, req, pending):
        return None


@pytest.mark.parametrize("handler,expected", [
    (_one, False),
    (_two, True),
    (_two_with_default, True),
    (_varargs, True),
    (_kwonly, False),
    (lambda req: None, False),
    (lambda req, pending: None, True),
    (_Method().one, False),
    (_Method().two, True),
    (functools.partial(_two, "bound-req"), False),
])
def test_handler_arity(handler, expected):
    assert _takes_two_args(handler) is expected
