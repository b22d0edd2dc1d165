"""argparse types that reject bad numbers with the flag, the value and what is allowed (argparse adds the flag), and
a help formatter that states each default once."""
from __future__ import annotations

import argparse
from typing import Callable


def bounded(kind: type, minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    """A `type=` for argparse: `kind` (int or float) at least (or, not inclusive, above) `minimum`."""
    relation = ">=" if inclusive else ">"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"{relation} {minimum:g}, got {text!r}") from None
        if value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a value {relation} {minimum:g}, got {text!r}")
        return value
    parse.__name__ = f"{kind.__name__} {relation} {minimum:g}"
    return parse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help states it: a default worked out from other options
    is None to argparse, and "(default: None)" after "(default: ... beside --captions)" would contradict it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)
