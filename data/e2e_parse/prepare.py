"""
E2E reversed (English -> meaning representation), a parsing task from the same shipped E2E files.

    python data/e2e_parse/prepare.py                    # the copy shipped in data/e2e/source (no network)
    python data/e2e_parse/prepare.py --limit 300 --out /tmp/e2e_parse   # quick test
    (--src DIR and --download as data/e2e/prepare.py)

Every CSV row (header `mr,ref`) becomes one example, the other way round from data/e2e:
    context    = ref + " ||"                   e.g. "Blue Spice is a coffee shop. ||"
    completion = " " + mr + "<|endoftext|>"    e.g. " name[Blue Spice], eatType[coffee shop]<|endoftext|>"
The files are data/e2e's ({split}.bin, {split}_examples.bin, meta.json with "task": "ref -> mr",
written by data/e2e/prepare.py's own code), without the {split}_refs.json that score generated texts.
A second task for train.py --tasks (one shared A, one B per task; docs/bank.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import run  # noqa: E402
from data.e2e import prepare as e2e  # noqa: E402


def options(argv=None):
    return e2e.options(argv, __file__, __doc__)


def main(argv=None):
    e2e.main(argv, reverse=True, script=__file__, doc=__doc__)


if __name__ == "__main__":
    run(main)
