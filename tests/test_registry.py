"""The shared name -> entry table behind objectives, methods, extrapolation rules, layouts and families."""

import pytest

from jaxunlearn.extrapolate import RULES, UnknownRuleError
from jaxunlearn.methods import METHODS
from jaxunlearn.models.families import FAMILIES, LAYOUTS
from jaxunlearn.objectives import OBJECTIVES
from jaxunlearn.registry import Registry


class NoSuchThing(ValueError):
    pass


def test_add_refuses_a_second_entry_and_keeps_the_first():
    things = Registry("thing", NoSuchThing)
    first = things.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        things.add("a", 2)
    assert first == 1 and things == {"a": 1}


def test_lookup_names_the_known_entries_in_the_registrys_own_error():
    things = Registry("thing", NoSuchThing)
    things.add("b", 2)
    things.add("a", 1)
    assert things.lookup("b") == 2
    with pytest.raises(NoSuchThing, match=r"^unknown thing 'c' \(known: a, b\)$"):
        things.lookup("c")


def test_every_extension_point_is_one_registry():
    for registry in (OBJECTIVES, METHODS, RULES, LAYOUTS, FAMILIES):
        assert isinstance(registry, Registry) and len(registry) > 0
    with pytest.raises(UnknownRuleError):
        RULES.lookup("nope")
