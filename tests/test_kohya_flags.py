"""Every kohya flag of the scripts users copy command lines from is accepted by ours (working, or refused by name
with the reason), measured against kohya's own parsers.

tests/data/kohya_flags.json holds kohya's flags per script (kohya-ss/sd-scripts at the commit it names, made by
benchmarks/kohya_flags.py). tests/data/kohya_flags_not_yet.json lists, per script, the kohya flags ours do not
accept yet (null: the script does not exist here yet): the work left (issue 16). A flag missing from a parser and
not listed there is a regression and fails here; when a listed flag starts being accepted, take it off the list
(`python tests/test_kohya_flags.py` prints the counts and the flags to remove; `--update` removes them).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
KOHYA = json.loads((DATA / "kohya_flags.json").read_text())
NOT_YET = json.loads((DATA / "kohya_flags_not_yet.json").read_text())
OURS = {"train_control_net": "train_controlnet"}  # kohya's name of a script we also ship under another name


def our_flags(script: str) -> set[str] | None:
    """The option strings our script of that name accepts; None when we have no such script."""
    try:
        module = importlib.import_module(OURS.get(script, script))
    except ModuleNotFoundError as e:
        if e.name and OURS.get(script, script).startswith(e.name):
            return None
        raise
    return {option for action in module.setup_parser()._actions for option in action.option_strings}


def missing(script: str) -> list[str] | None:
    ours = our_flags(script)
    return None if ours is None else [flag for flag in KOHYA["flags"][script] if flag not in ours]


@pytest.mark.parametrize("script", sorted(KOHYA["flags"]))
def test_every_kohya_flag_is_accepted_or_listed_as_work_left(script):
    absent = missing(script)
    listed = NOT_YET.get(script, [])
    if absent is None:
        assert listed is None, f"{script}.py does not exist here: list it as null in kohya_flags_not_yet.json"
        return
    regressions = sorted(set(absent) - set(listed or []))
    assert not regressions, f"{script}: kohya flags no longer accepted (or never listed): {regressions}"


def coverage() -> None:
    total = accepted = 0
    for script, flags in KOHYA["flags"].items():
        absent = missing(script)
        n = len(flags) - (len(flags) if absent is None else len(absent))
        total, accepted = total + len(flags), accepted + n
        done = sorted(set(NOT_YET.get(script) or []) - set(absent or [])) if absent is not None else []
        print(f"{script}: {n} of {len(flags)}" + (f"; accepted now, take off the list: {done}" if done else ""))
    print(f"all: {accepted} of {total} ({100 * accepted / total:.0f} %), kohya {KOHYA['kohya_commit'][:8]}")


def take_accepted_off_the_list() -> None:
    """Rewrite kohya_flags_not_yet.json without the flags now accepted (never adding any: a flag that stopped
    being accepted is a regression to fix, not to list)."""
    updated = {}
    for script, listed in NOT_YET.items():
        absent = missing(script)
        updated[script] = None if absent is None else [flag for flag in (listed or []) if flag in absent]
    (DATA / "kohya_flags_not_yet.json").write_text(json.dumps(updated, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if "--update" in sys.argv:
        take_accepted_off_the_list()
    coverage()
