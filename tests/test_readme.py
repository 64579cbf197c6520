"""README's flag table names every flag the entry scripts take."""

import argparse
import re

from llmbench.cli import build_parser
from tests.conftest import ROOT


def readme_flags() -> tuple[set[str], tuple[str, ...]]:
    """-> (flags named in the first column of README's flag table, prefixes given as `--woq-*`-style wildcards)."""
    named, prefixes = set(), []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`-"):
            continue
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*\*?)", cells[1]):
            if flag.endswith("*"):
                prefixes.append(flag[:-1])
            else:
                named.add(flag)
    return named, tuple(prefixes)


def test_readme_flag_table_names_every_flag():
    named, prefixes = readme_flags()
    missing = [option for action in build_parser()._actions if action.help != argparse.SUPPRESS
               and not isinstance(action, argparse._HelpAction)
               for option in action.option_strings if option not in named and not option.startswith(prefixes)]
    assert missing == []
