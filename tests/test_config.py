"""Settings (config.py): the checks a field's declaration gives, with the message naming the
flag, and the absl flags defined from the same declarations and read back."""

import dataclasses
import math

import pytest
from absl import flags

from fedmask_jax import config as C
from fedmask_jax.config import check, setting


def _even(value):
    return None if value % 2 == 0 else f"must be even, got {value}"


@dataclasses.dataclass(frozen=True)
class Toy:
    count: int = setting(1, "A count.", min=1)
    rate: float = setting(0.5, "A rate in (0, 1).", min=0, max=1, min_open=True, max_open=True)
    share: float = setting(1.0, "A share in (0, 1].", min=0, max=1, min_open=True)
    below: float = setting(0.0, "At most 2.", max=2)
    kind: str = setting("a", "A kind.", choices=("a", "b"))
    pairs: int = setting(2, "Even.", check=_even, min=0)
    sizes: tuple[int, ...] = setting((3, 4), "Sizes.", min=1)
    folder: str | None = setting(None, "Optional.")
    on: bool = setting(False, "A switch.")
    lr: float = setting(0.1, "Varies.", min=0, vary=True)
    hidden: int = setting(7, "Set from Python only.", flag=False)
    plain: int = 0  # no setting(): not a flag, not checked

    def __post_init__(self):
        check(self)


def _error(**values) -> str:
    with pytest.raises(ValueError) as error:
        Toy(**values)
    return str(error.value)


def test_defaults_pass_and_the_bounds_themselves_are_allowed_when_closed():
    Toy()
    Toy(count=1, share=1.0, below=2.0, pairs=0, sizes=(1,))


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, "--count must be >= 1, got 0"),
    ({"rate": 0.0}, "--rate must be in (0, 1), got 0.0"),
    ({"rate": 1.0}, "--rate must be in (0, 1), got 1.0"),
    ({"share": 0.0}, "--share must be in (0, 1], got 0.0"),
    ({"share": 1.5}, "--share must be in (0, 1], got 1.5"),
    ({"below": 2.5}, "--below must be <= 2, got 2.5"),
    ({"sizes": (3, 0)}, "--sizes must be >= 1, got (3, 0)"),
])
def test_a_value_out_of_bounds_names_the_flag_and_the_bounds(values, message):
    assert _error(**values) == message


def test_open_lower_bound_reads_as_strictly_greater():
    @dataclasses.dataclass(frozen=True)
    class Positive:
        lr: float = setting(1.0, "Positive.", min=0, min_open=True)

        def __post_init__(self):
            check(self)

    Positive(lr=1e-12)
    with pytest.raises(ValueError, match=r"^--lr must be > 0, got 0$"):
        Positive(lr=0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_fail_every_numeric_check(value):
    assert _error(rate=value) == f"--rate must be a finite number, got {value!r}"
    assert _error(below=value).startswith("--below must be a finite number")


@pytest.mark.parametrize("values, message", [
    ({"count": 2.0}, "--count must be an integer, got 2.0"),
    ({"count": True}, "--count must be an integer, got True"),
    ({"rate": "0.5"}, "--rate must be a number, got '0.5'"),
    ({"rate": False}, "--rate must be a number, got False"),
    ({"on": 1}, "--on must be true or false, got 1"),
    ({"kind": 3}, "--kind must be a string, got 3"),
    ({"sizes": [3, 4]}, "--sizes must be a list of integers, got [3, 4]"),
    ({"sizes": (3, True)}, "--sizes must be a list of integers, got (3, True)"),
    ({"count": None}, "--count must be set"),
])
def test_a_value_of_the_wrong_type_is_refused(values, message):
    assert _error(**values) == message


def test_an_int_is_a_valid_float():
    assert Toy(rate=0.5, below=1).below == 1


def test_choices_list_what_is_allowed():
    Toy(kind="b")
    assert _error(kind="c") == "--kind='c' is unknown; allowed: a, b"


def test_a_custom_check_runs_after_the_bounds():
    Toy(pairs=4)
    assert _error(pairs=3) == "--pairs must be even, got 3"
    assert _error(pairs=-2) == "--pairs must be >= 0, got -2"  # the bound is reported first


def test_optional_fields_accept_none_and_their_type():
    assert Toy(folder="x").folder == "x"
    assert _error(folder=3) == "--folder must be a string, got 3"


def test_the_first_bad_field_in_declaration_order_is_reported():
    assert _error(kind="z", count=0).startswith("--count ")


def test_fields_without_a_setting_and_non_flags_are_not_flags_but_settings_are_checked():
    assert Toy(plain=-5).plain == -5  # not a setting: nothing to check
    names = [f.name for f in C.flag_fields(Toy)]
    assert names == ["count", "rate", "share", "below", "kind", "pairs", "sizes", "folder", "on", "lr"]
    assert _error(hidden=1.5) == "--hidden must be an integer, got 1.5"  # flag=False is still checked


def test_varying_names_the_settings_runs_may_differ_in():
    assert C.varying(Toy) == {"lr"}


def test_field_type_drops_the_optional():
    assert C.field_type(Toy, "folder") is str
    assert C.field_type(Toy, "count") is int


def test_problem_says_what_is_wrong_without_the_flag():
    meta = dataclasses.fields(Toy)[0].metadata
    assert C.problem("count", 0, int, meta) == "must be >= 1, got 0"
    assert C.problem("count", 3, int, meta) is None


def _flags(owners, argv=(), **kwargs):
    values = flags.FlagValues()
    names = C.define_flags(owners, values, **kwargs)
    values(["prog", *argv])
    return values, names


def test_define_flags_gives_one_typed_flag_per_setting_with_its_default_and_help():
    values, names = _flags([("toy", Toy)])
    assert names == [f.name for f in C.flag_fields(Toy)]
    assert "hidden" not in values and "plain" not in values
    assert values["count"].value == 1 and values["rate"].value == 0.5 and values["on"].value is False
    assert values["sizes"].value == ["3", "4"] and values["folder"].value is None
    assert values["count"].help == "A count."


def test_parsed_flags_come_back_as_the_fields_types():
    values, _ = _flags([("toy", Toy)], ["--count=4", "--sizes=5,6", "--kind=b", "--on", "--rate=0.25"])
    read = {f.name: C.from_flag(Toy, f.name, values[f.name].value) for f in C.flag_fields(Toy)}
    toy = Toy(**read)
    assert (toy.count, toy.sizes, toy.kind, toy.on, toy.rate) == (4, (5, 6), "b", True, 0.25)
    assert C.from_flag(Toy, "folder", None) is None


def test_an_unknown_choice_fails_at_parsing():
    with pytest.raises(flags.IllegalFlagValueError):
        _flags([("toy", Toy)], ["--kind=c"])


def test_a_list_of_non_integers_names_the_flag():
    with pytest.raises(ValueError) as error:
        C.from_flag(Toy, "sizes", ["5", "x"])
    assert str(error.value) == "--sizes must be a list of integers, got '5,x'"


@dataclasses.dataclass(frozen=True)
class OwnerA:
    lr: float = setting(0.1, "Learning rate.", min=0)
    only_a: int = setting(1, "A's own.")


@dataclasses.dataclass(frozen=True)
class OwnerB:
    lr: float = setting(0.3, "Learning rate.", min=0)


def test_a_shared_setting_with_per_owner_defaults_has_no_default_and_names_each_owners():
    values, names = _flags([("a", OwnerA), ("b", OwnerB)], per_owner_defaults=True)
    assert sorted(names) == ["lr", "only_a"]
    assert values["lr"].value is None and not values["lr"].present
    assert values["lr"].help == "Learning rate. Applies to: a (default 0.1); b (default 0.3)."
    same, _ = _flags([("a", OwnerA), ("c", OwnerA)], per_owner_defaults=True)
    assert same["lr"].help == "Learning rate. Applies to: a, c (default 0.1)."


def test_a_setting_two_owners_type_differently_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class IntLr:
        lr: int = setting(1, "Learning rate.")

    with pytest.raises(TypeError, match="'lr' is typed differently"):
        C.define_flags([("a", OwnerA), ("b", IntLr)], flags.FlagValues(), per_owner_defaults=True)


def test_a_real_config_reports_its_flag():
    from fedmask_jax.algorithms import registry

    with pytest.raises(ValueError, match=r"^--server_lr must be > 0, got 0.0$"):
        registry.method_config("fedavg", server_lr=0.0)
    assert {"client_lr", "server_lr"} <= C.varying(registry.spec("fedavg").config)
