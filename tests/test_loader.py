"""
data/loader.py's batches of E2E examples: length grouping pads little, shows every example of an epoch
exactly once, and is a pure function of (split, index, seed); random batches stay as they were.
On the E2E subset the tests prepare (2,000 training rows; the README gives the full set's figures).
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.common import VARIANTS  # noqa: E402
from data.loader import Batches  # noqa: E402


@pytest.mark.parametrize("batch_size", [8, 16, 32])
def test_length_grouping_pads_under_2_percent(data, batch_size):
    grouped = Batches(data["e2e"], batch_size, 1024, seed=1)
    plain = Batches(data["e2e"], batch_size, 1024, seed=1, group_by_length=False)
    assert grouped.padding_share() <= 0.02
    assert plain.padding_share() > 0.15  # what grouping saves: random batches are a fifth padding or more


def test_padding_share_counts_what_a_batch_holds(data):
    """padding_share, from lengths only, against the batches themselves: the positions where y is -100
    beyond each row's own length."""
    b = Batches(data["e2e"], 8, 1024, seed=3)
    used = padded = 0
    for i in range(20):
        x, y = b.get("train", i)
        lengths = [min(int(b.examples["train"][k, 2]), 1025) - 1 for k in b.batch_examples("train", i)]
        assert x.shape == (len(lengths), max(lengths))
        used, padded = used + sum(lengths), padded + x.numel()
    assert b.padding_share(batches=20) == pytest.approx(1 - used / padded)


@pytest.mark.parametrize("batch_size", [7, 8])
def test_every_example_once_an_epoch(data, batch_size):
    b = Batches(data["e2e"], batch_size, 1024, seed=5)
    n = len(b.examples["train"])
    steps = b.epoch_steps()
    assert steps == -(-n // batch_size)
    for epoch in (0, 1):
        seen = [k for i in range(epoch * steps, (epoch + 1) * steps) for k in b.batch_examples("train", i)]
        assert sorted(seen) == list(range(n))
    first = [b.batch_examples("train", i) for i in range(steps)]
    second = [b.batch_examples("train", steps + i) for i in range(steps)]
    assert first != second  # each epoch its own order


def test_a_pure_function_of_split_index_and_seed(data):
    a, b = Batches(data["e2e"], 8, 1024, seed=11), Batches(data["e2e"], 8, 1024, seed=11)
    indices = [0, 5, 3, 900, 2, 5]
    for i in indices:  # any order, any object: the same batch
        for split in ("train", "val"):
            assert all((u == v).all() for u, v in zip(a.get(split, i), b.get(split, i)))
    other = Batches(data["e2e"], 8, 1024, seed=12)
    assert a.batch_examples("train", 0) != other.batch_examples("train", 0)


def test_grouped_batches_are_still_random(data):
    """Grouping sorts only within windows and then shuffles the batches: batch lengths do not rise
    through the epoch, and a batch's examples are not neighbours in the file."""
    b = Batches(data["e2e"], 8, 1024, seed=2)
    longest = [max(int(b.examples["train"][k, 2]) for k in b.batch_examples("train", i)) for i in range(60)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    spread = [max(ks) - min(ks) for ks in (b.batch_examples("train", i) for i in range(60))]
    assert sum(spread) / len(spread) > len(b.examples["train"]) / 20


def test_missing_data_names_the_script_that_makes_it(tmp_path):
    """A folder named after a shipped data set gets its script; any other folder the scripts with --out."""
    with pytest.raises(FileNotFoundError, match=rf"run python data/e2e/prepare.py --out {tmp_path / 'e2e'} first"):
        Batches(tmp_path / "e2e", 8, 64)  # not data/e2e, where the script writes by default: told where
    elsewhere = tmp_path / "mine"
    with pytest.raises(FileNotFoundError) as e:
        Batches(elsewhere, 8, 64)
    for name in ("e2e", "shakespeare"):
        assert f"python data/{name}/prepare.py --out {elsewhere}" in str(e.value)


@pytest.mark.parametrize("folder", sorted(VARIANTS))
def test_a_folder_a_script_writes_with_an_option_gets_that_option(folder, tmp_path):
    """data/e2e_parse (E2E reversed) is what e2e/prepare.py --reverse writes: the hint is that command, not
    e2e/prepare.py --out data/e2e_parse, which would put forward E2E there; and the script says so itself."""
    with pytest.raises(FileNotFoundError, match=f"run {VARIANTS[folder]} --out {tmp_path / folder} first"):
        Batches(tmp_path / folder, 8, 64)
    script, option = VARIANTS[folder].split()[1:3]
    shown = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert f"{option}, data/{folder}" in " ".join(shown.split()), shown  # its --out help: the default folder
