"""ztunnel's InboundLimits from ZTUNNEL_* variables, HTTP/2 abuse bounds included."""
import dataclasses

import pytest

from mesh.hbone.abuse import AbuseLimits
from ztunnel.config import InboundLimits


def test_defaults_without_variables():
    assert InboundLimits.from_env({}) == InboundLimits()
    assert InboundLimits().h2 == AbuseLimits()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(AbuseLimits)])
def test_every_abuse_bound_has_its_variable(field):
    default = getattr(AbuseLimits(), field)
    value = type(default)(default * 3)
    limits = InboundLimits.from_env({"ZTUNNEL_" + field.upper(): str(value)})
    assert getattr(limits.h2, field) == value
    others = {f.name for f in dataclasses.fields(AbuseLimits)} - {field}
    assert all(getattr(limits.h2, o) == getattr(AbuseLimits(), o) for o in others)


@pytest.mark.parametrize("env, needle", [
    ({"ZTUNNEL_PING_BURST": "0"}, "ping_burst"),
    ({"ZTUNNEL_NEW_STREAM_RATE": "-1"}, "new_stream_rate"),
    ({"ZTUNNEL_MAX_PREMATURE_RESETS": "lots"}, "ZTUNNEL_MAX_PREMATURE_RESETS"),
])
def test_bad_values_name_the_variable_or_field(env, needle):
    with pytest.raises(ValueError, match=needle):
        InboundLimits.from_env(env)
