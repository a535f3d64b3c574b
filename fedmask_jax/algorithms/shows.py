"""What a method's runs show beyond the fields every run has: a declaration on its ``MethodSpec``.

Every run reports accuracy, losses, clients and uplink bits, and the sinks, plots and tables
show those themselves. A method that records more (FedPM: a second accuracy, the coded
uplink, the mask's density) declares here which of its fields to show and how; the console
line, the summary line, the plots and the tables read the declaration of the run's method and
never a method's name. A field declared but absent from a record is left out of that line, so
one declaration covers a method's runs with and without an optional feature.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Column:
    """One field on the console line, shown as ``label`` then ``format``: a ``str.format``
    template given the value as ``{}`` and the record's other fields by name (``{other:.3f}``);
    left out of a round whose record lacks ``key``."""

    key: str
    label: str
    format: str = "{}"


@dataclasses.dataclass(frozen=True)
class SecondAccuracy:
    """A second model the method evaluates every round beside ``test_accuracy`` (FedPM: the
    thresholded mask besides a sampled one). ``key`` is its record field; the summary's is
    ``final_<key>``."""

    key: str
    console: str  # "acc 0.8100 (<console> 0.8000)"
    summary: str  # "test accuracy 0.8100 (<summary> 0.8000)"
    curve: str  # the plot's legend for its dashed curve
    first_curve: str  # the legend for test_accuracy's curve when the two differ


@dataclasses.dataclass(frozen=True)
class CodedUplink:
    """The uplink as the method codes it, which plots and tables prefer to the ideal bits."""

    bits: str  # record field: cumulative bits, the plots' x axis
    bpp: str  # summary field: mean bits per parameter, the tables' column
    header: str  # the comparison table's column header
    curve: str  # the comparison plot's legend for its dashed curve
    also: tuple[str, ...] = ()  # further summary fields a comparison row keeps beside ``bpp``

    @property
    def metric(self) -> str:
        """The client metric behind ``bits``: a message's coded bits per parameter."""
        return "uplink_bpp" + self.bits[len("cumulative_uplink_bits"):]


@dataclasses.dataclass(frozen=True)
class Shows:
    """The default (all empty) suits a plain dense method: nothing beyond the common fields."""

    columns: tuple[Column, ...] = ()  # on the console line, after the uplink bits
    accuracy_also: SecondAccuracy | None = None
    coded_uplink: CodedUplink | None = None
    # (summary field, text): appended to the summary line after the mean uplink when the
    # summary has the field; ``text`` is a template as ``Column.format``'s.
    summary: tuple[tuple[str, str], ...] = ()
    results: tuple[str, ...] = ()  # further summary fields a sweep's table and a comparison's rows carry

    def accuracy_results(self) -> tuple[str, ...]:
        return (f"final_{self.accuracy_also.key}",) if self.accuracy_also else ()

    def uplink_results(self) -> tuple[str, ...]:
        return ((self.coded_uplink.bpp,) if self.coded_uplink else ()) + self.results


def fill(template: str, value, fields: dict) -> str:
    """``template`` given ``value`` as ``{}`` and ``fields`` by name."""
    return template.format(value, **fields)


def result_columns(declared: Iterable[Shows]) -> tuple[list[str], list[str]]:
    """The accuracy and the uplink summary fields some declaration shows, each once, in the
    declarations' order: what a table over runs of any of these methods has columns for."""
    declared = list(declared)
    accuracy = dict.fromkeys(k for s in declared for k in s.accuracy_results())
    uplink = dict.fromkeys(k for s in declared for k in s.uplink_results())
    return list(accuracy), list(uplink)
