"""
e2e_metrics.py against the official E2E scorer (tuetschek/e2e-metrics, measure_scores.py, default Perl
BLEU/NIST, pycocoevalcap 1.2 jars): all five metrics on 27 prediction files the official tool scored
(tests/fixtures/e2e_official: copies, truncations, empty lines, punctuation, non-ASCII, a stand-in
model's outputs...), five scores pinned on the leave-one-out case, small cases worked out by hand, the
official file layout, and `evaluate_e2e.py --predictions --references` with and without Java.

The Java metrics (METEOR, ROUGE-L, CIDEr) are skipped where no Java runtime is installed, except under
CI (the CI variable set): .ci/run installs Java, so there a missing one fails instead of hiding.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import e2e_metrics as em  # noqa: E402
from data.e2e.prepare import CSVS, group_refs, read_rows, read_sources  # noqa: E402
from tools.evaluate_e2e import one_line  # noqa: E402

needs_java = pytest.mark.skipif(em.java_missing() is not None and not os.environ.get("CI"),
                                reason=em.java_missing() or "")

# The official tool on the leave-one-out case (measure_scores.py, printed to 4 decimals, BLEU, METEOR and
# ROUGE_L on 0-1) and how close ours must come: BLEU and ROUGE-L to 0.01 points of 100, the others to 0.005
# on the official scale (METEOR's 0.005 is 0.5 on ours).
OFFICIAL = {"bleu": 0.6046, "nist": 8.9029, "meteor": 0.4563, "rouge_l": 0.6381, "cider": 1.8572}
SCALE = {"bleu": 100, "nist": 1, "meteor": 100, "rouge_l": 100, "cider": 1}
TOLERANCE = {"bleu": 0.01 + 0.005, "nist": 0.005, "meteor": 0.5, "rouge_l": 0.01 + 0.005, "cider": 0.005}
# (+0.005 for BLEU and ROUGE-L: the official 4 decimals on 0-1 are 2 on 0-100, themselves rounded)


@pytest.fixture(scope="module")
def leave_one_out(tmp_path_factory):
    """Every test MR with at least two references (616 of 630, in test_refs.json's order): its first
    reference is the prediction, the others are the references. Written in the official layout, from
    the E2E copy shipped in data/e2e/source."""
    groups = [g for g in group_refs(read_rows(read_sources()["test"], CSVS["test"])) if len(g["refs"]) >= 2]
    preds = [" ".join(g["refs"][0].split()) for g in groups]
    refs = [[" ".join(r.split()) for r in g["refs"][1:]] for g in groups]
    d = tmp_path_factory.mktemp("loo")
    (d / "predictions.txt").write_text("".join(p + "\n" for p in preds), encoding="utf-8")
    (d / "references.txt").write_text("\n".join("".join(r + "\n" for r in rs) for rs in refs), encoding="utf-8")
    return preds, refs, d


# ---- the official scorer's figures on 27 generated cases ------------------------------------------
# tests/fixtures/e2e_official/make_cases.py wrote each case (one prediction per line for the test set's
# first N MRs) and scored it once with the official tool; official.json holds its printed figures (4
# decimals, BLEU, METEOR and ROUGE_L on 0-1) and the command. How close ours must come, on that scale:
CASES_DIR = ROOT / "tests" / "fixtures" / "e2e_official"
CASES = json.loads((CASES_DIR / "official.json").read_text(encoding="utf-8"))["cases"]
AGREE = {"bleu": 0.001, "nist": 0.05, "meteor": 0.005, "rouge_l": 0.001, "cider": 0.005}
OFFICIAL_NAME = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr"}


@pytest.fixture(scope="module")
def cases():
    """{case: (predictions, references)}, the references those of the test set's first N MRs."""
    groups = group_refs(read_rows(read_sources()["test"], CSVS["test"]))
    out = {}
    for name, official in CASES.items():
        preds = em.parse_predictions((CASES_DIR / "cases" / f"{name}.txt").read_text(encoding="utf-8"))
        out[name] = preds, [[one_line(r) for r in g["refs"]] for g in groups[:official["mrs"]]]
    return out


@pytest.fixture(scope="module")
def coco_scores(cases):
    """METEOR, ROUGE-L and CIDEr of every case, in one process (the METEOR jar loads once) and after one
    run of the PTB tokenizer over all the cases' texts (Java starts once more, not 27 times): 36 s on
    2 shared cores."""
    texts = [[*preds, *(r for refs in references for r in refs)] for preds, references in cases.values()]
    tokens = em.split_like(em.ptb_tokenize([t for case in texts for t in case]), texts)
    scores = {}
    for (name, (preds, references)), toks in zip(cases.items(), tokens):
        scores[name] = em.coco_scores(toks[:len(preds)], em.split_like(toks[len(preds):], references))
    return scores


def agrees(metric, ours, official):
    return abs(ours / SCALE[metric] - official[OFFICIAL_NAME[metric]]) <= AGREE[metric]


def test_the_cases_are_varied():
    """At least 20 cases, a few on all 630 MRs, and NIST's length penalty exercised: the official NIST
    is under 2 for the first halves of references, over 10 for whole ones."""
    assert len(CASES) >= 20 and sum(c["mrs"] == 630 for c in CASES.values()) >= 3
    assert CASES["first_half_of_a_reference"]["NIST"] < 2 < 10 < CASES["copy_first_reference"]["NIST"]


def test_the_case_files_are_what_make_cases_writes():
    """The generator is the record of how the cases were made: a change to it that would need the
    official scorer run again shows here (the stand-in model's four files come from a training run)."""
    sys.path.insert(0, str(CASES_DIR))
    import make_cases
    written = make_cases.synthetic_cases(make_cases.test_groups())
    assert sorted(written) == sorted(n for n in CASES if not n.startswith("standin_"))
    for name, preds in written.items():
        assert (CASES_DIR / "cases" / f"{name}.txt").read_text(encoding="utf-8") == "".join(p + "\n" for p in preds), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_bleu_and_nist_agree_on_every_case(cases, name):
    scores = em.mteval(*cases[name])
    for metric in ("bleu", "nist"):
        assert agrees(metric, scores[metric], CASES[name]), (name, metric, scores[metric], CASES[name])


@needs_java
@pytest.mark.parametrize("name", sorted(CASES))
def test_meteor_rouge_l_and_cider_agree_on_every_case(coco_scores, name):
    for metric in ("meteor", "rouge_l", "cider"):
        ours = coco_scores[name][metric]
        assert agrees(metric, ours, CASES[name]), (name, metric, ours, CASES[name])


def test_leave_one_out_case_has_616_mrs(leave_one_out):
    preds, refs, _ = leave_one_out
    assert len(preds) == 616 and max(map(len, refs)) == 44 and min(map(len, refs)) == 1


@pytest.mark.parametrize("metric", ["bleu", "nist"])
def test_bleu_and_nist_agree_with_the_official_scorer(leave_one_out, metric):
    preds, refs, _ = leave_one_out
    ours = getattr(em, metric)(preds, refs)
    assert abs(ours - SCALE[metric] * OFFICIAL[metric]) <= TOLERANCE[metric], (metric, ours)


@needs_java
def test_cli_scores_the_official_files_like_the_official_scorer(leave_one_out, tmp_path):
    """All five, through the command line that scores files without a model."""
    _, _, d = leave_one_out
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_e2e.py"), "--predictions", str(d / "predictions.txt"),
                        "--references", str(d / "references.txt"), "--results_dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("616 MRs: BLEU 60.46, NIST 8.9029, METEOR 45.63, ROUGE-L 63.81, CIDEr 1.857")
    scores = json.loads((tmp_path / "scores.json").read_text())
    for metric, official in OFFICIAL.items():
        assert abs(scores[metric] - SCALE[metric] * official) <= TOLERANCE[metric], (metric, scores[metric])


def test_without_java_bleu_and_nist_remain_and_one_line_says_why(leave_one_out):
    _, _, d = leave_one_out
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no java on this PATH
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_e2e.py"), "--predictions", str(d / "predictions.txt"),
                        "--references", str(d / "references.txt")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "616 MRs: BLEU 60.46, NIST 8.9029\n"
    assert r.stderr.count("\n") == 1 and "Java" in r.stderr and "default-jre-headless" in r.stderr


def test_a_java_that_fails_is_reported_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").write_text("#!/bin/sh\necho 'Error: could not create the Java Virtual Machine.' >&2\nexit 1\n")
    (bin_dir / "java").chmod(0o755)
    (tmp_path / "p.txt").write_text("The Vaults is a pub.\n")
    (tmp_path / "r.txt").write_text("The Vaults is a pub.\nThe Vaults is a local pub.\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_e2e.py"), "--predictions", str(tmp_path / "p.txt"),
                        "--references", str(tmp_path / "r.txt")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.startswith("1 MRs: BLEU 100.00, NIST "), r.stderr
    assert r.stderr == "note: METEOR, ROUGE-L and CIDEr were skipped: java failed " \
                       "(Error: could not create the Java Virtual Machine.)\n"


@pytest.mark.parametrize("case", ["fewer predictions", "only one file", "missing file", "not UTF-8", "no references",
                                  "with --limit", "results_dir is a file"])
def test_bad_files_get_one_line(leave_one_out, tmp_path, case):
    _, _, d = leave_one_out
    pred, ref = d / "predictions.txt", d / "references.txt"
    bad = tmp_path / "bad.txt"
    if case == "fewer predictions":
        bad.write_text("one line\n")
        argv, expect = ["--predictions", bad, "--references", ref], "has 1 lines but --references"
    elif case == "only one file":
        argv, expect = ["--predictions", pred], "--predictions and --references go together"
    elif case == "missing file":
        argv, expect = ["--predictions", pred, "--references", tmp_path / "none.txt"], "is not a file"
    elif case == "not UTF-8":
        bad.write_bytes(b"caf\xe9\n")
        argv, expect = ["--predictions", bad, "--references", ref], "is not UTF-8"
    elif case == "no references":
        bad.write_text("\n\n")
        argv, expect = ["--predictions", pred, "--references", bad], "holds no reference"
    elif case == "with --limit":
        argv, expect = ["--predictions", pred, "--references", ref, "--limit", "3"], "leave out --out_dir, --adapter, --bank, --init_from and --limit"
    else:
        bad.write_text("x")
        argv, expect = ["--predictions", pred, "--references", ref, "--results_dir", bad], "is a file, not a folder"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_e2e.py"), *map(str, argv)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert expect in r.stderr


# ---- small cases worked out by hand --------------------------------------------------------

REFS = [["The Vaults is a pub.", "The Vaults is a local pub.", "There is a pub called The Vaults."],
        ["Blue Spice serves Chinese food."],
        ["Zizzi is by the riverside.", "Near the river is Zizzi."]]


def test_references_score_full_marks_against_themselves():
    for k in (0, 1):  # the first reference of each MR, then the second where there is one
        preds = [refs[min(k, len(refs) - 1)] for refs in REFS]
        assert em.bleu(preds, REFS) == pytest.approx(100.0)
    # the official BLEU ignores case (mteval-v13a without -c), and so does ours
    assert em.bleu([r[0].upper() for r in REFS], REFS) == pytest.approx(100.0)


def test_known_bleu():
    """hyp "the cat sat on the mat", ref "the cat sat on a mat": n-gram precisions 5/6, 3/5, 2/4, 1/3,
    equal lengths (no brevity penalty): BLEU = 100 (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = 53.73. A second,
    unrelated reference changes nothing (no clipped n-gram gains, the same closest length)."""
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    for refs in ([ref], [ref, "dogs bark loudly here today"]):
        assert em.bleu([hyp], [refs]) == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_bleu_smoothing_and_missing_orders_as_mteval():
    """mteval's smoothing: "a b c" against "a b d" matches 2/3 words, 1/2 bigrams, no trigram (the
    first empty order counts 1/2 of its 1 trigram) and has no 4-gram at all (counts 1): BLEU =
    100 (2/3 * 1/2 * 1/2 * 1)^(1/4) = 63.89, and "a" against "a" is 100. mteval-v13a-sig.pl prints
    0.6389 and 1.0000 for these files; sacrebleu 2.6 gives 0 for both."""
    assert em.bleu(["a b c"], [["a b d"]]) == pytest.approx(100 * (2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert em.bleu(["a"], [["a"]]) == pytest.approx(100.0)


def test_variable_reference_counts():
    """A missing reference counts as absent: the same BLEU as padding with a duplicate of an existing
    reference, which changes neither the clipped n-gram counts nor the closest length."""
    from sacrebleu.metrics import BLEU
    preds = ["The Vaults is a pub in town.", "Blue Spice serves food.", "Zizzi is near the river."]
    dup = [[refs[j] if j < len(refs) else refs[0] for refs in REFS] for j in range(3)]
    expected = BLEU(lowercase=True).corpus_score(preds, dup).score
    assert 0 < expected < 100 and em.bleu(preds, REFS) == pytest.approx(expected, abs=1e-9)


def test_known_nist():
    """References "a b" and "a c": 4 words, a twice, so info(a) = log2(4/2) = 1, info(b) = info(c) =
    log2(4/1) = 2, info(a b) = log2(count(a) / count(a b)) = log2(2/1) = 1.
    "a b" scores (1 + 2) / 2 unigrams + 1 / 1 bigram = 2.5, at full length (2 words against an average
    of 4 / 2 reference sets = 2). "a" alone: 1 / 1 = 1, times the length penalty at ratio 1/2,
    exp(-beta ln(1/2)^2) with beta = ln 2 / ln(1.5)^2 (a ratio of 2/3 costs half)."""
    refs = [["a b", "a c"]]
    assert em.nist(["a b"], refs) == pytest.approx(2.5)
    beta = math.log(2) / math.log(1.5) ** 2
    assert em.nist(["a"], refs) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))
    assert em.nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert em.nist(["x y"], refs) == 0  # nothing matches


def test_nist_length_penalty_uses_the_average_reference():
    """References "a b c d" for one MR, "a b" and "c d" for another: 8 words in 3 references, so the
    expected length is 2 MRs x 8/3 words, and two predictions "a b" (4 words) have a ratio of 0.75.
    Each word carries log2(8/2) = 2 bits, "a b" log2(2/2) = 0: NIST = 2 x the penalty at 0.75 = 1.4109,
    what mteval-v13a-sig.pl prints for these files. (Averaging over the official file's 2 reference
    sets, 8/2 words, would give the ratio 1 and no penalty.)"""
    refs = [["a b c d"], ["a b", "c d"]]
    assert em.nist(["a b", "a b"], refs) == pytest.approx(2 * em.nist_length_penalty(0.75))
    assert round(em.nist(["a b", "a b"], refs), 4) == 1.4109
    assert em.nist(["a b c d", "a b"], refs) == pytest.approx(2 + 1 / 4 + 1 / 2)  # 6 words: no penalty


def test_nist_weighs_a_bigram_after_a_zero_like_a_word():
    """mteval's quirk, kept: the context "0" is false in Perl, so info("0 a") = log2(4 words / 1) = 2,
    not log2(count("0") / count("0 a")) = 1: "0 a" against "0 a" and "0 b" scores (1 + 2) / 2 + 2 = 3.5,
    what mteval-v13a-sig.pl prints for these files (the same with "1" scores 2.5)."""
    assert em.nist(["0 a"], [["0 a", "0 b"]]) == pytest.approx(3.5)
    assert em.nist(["1 a"], [["1 a", "1 b"]]) == pytest.approx(2.5)


def test_mteval_tokens():
    """mteval-v13a's default tokenization: lowercased, punctuation split off, but not a period or comma
    between digits, and a dash only after a digit."""
    assert em.mteval_tokens("The Eagle, near Café Rouge, costs £20-25. Family-friendly!") == \
        "the eagle , near café rouge , costs £20 - 25 . family-friendly !".split()
    assert em.mteval_tokens("rated 4.5 out of 5") == "rated 4.5 out of 5".split()
    # ASCII letters only are lowercased (Perl's tr/A-Z/a-z/), SGML entities decoded, "5." and ".5" split
    assert em.mteval_tokens('CAFÉ &amp; <Eagle> costs .5 or 5. or 20,5 "x" it\'s 3-4 a-b') == \
        'cafÉ & < eagle > costs . 5 or 5 . or 20,5 " x " it\'s 3 - 4 a-b'.split()


@needs_java
def test_known_rouge_l_and_self_scores():
    """ROUGE-L as the COCO code: LCS "the cat sat on mat" is 5 of 6 words both ways, F = 5/6 whatever
    beta. Against itself every metric is at its top, CIDEr aside (it weights by idf over the set)."""
    scores = em.coco_metrics(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert scores["rouge_l"] == pytest.approx(100 * 5 / 6)
    own = em.coco_metrics([r[0] for r in REFS], REFS)
    assert own["rouge_l"] == pytest.approx(100.0) and own["meteor"] > 90


@needs_java
def test_ptb_tokenizer_as_the_official_rouge_sees_text():
    """Lowercased, "family-friendly" and "20-25" kept whole, "£" turned into "#", the punctuation list
    dropped, an empty text kept as one; and, faithfully to pycocoevalcap, the brackets' -LRB- / -RRB-
    survive: the tokenizer lowercases them before the (upper-case) list is checked."""
    assert em.ptb_tokenize(["The Eagle, a family-friendly pub, costs £20-25.", "", "It's near (riverside)."]) == \
        ["the eagle a family-friendly pub costs # 20-25", "", "it 's near -lrb- riverside -rrb-"]


def test_official_layout_parsers():
    assert em.parse_predictions(" a \nb\n") == ["a", "b"]
    assert em.parse_references("a\nb\n\nc\n") == [["a", "b"], ["c"]]
    assert em.parse_references("a\n\n\nc\n\n") == [["a"], ["c"]]  # extra blank lines start no empty MR
    with pytest.raises(ValueError, match="predictions for"):
        em.e2e_scores(["a"], [["a"], ["b"]], warn=False)
    with pytest.raises(ValueError, match="at least one reference"):
        em.e2e_scores(["a"], [[]], warn=False)


# ---- the parsing task (text -> MR): slot scores ----------------------------------------------

def test_mr_scores_by_hand():
    """Two predictions: one exact (2 pairs), one with 1 pair of which none is right, against 2 wanted:
    precision 2/3, recall 2/4, F1 4/7, exact 1 of 2."""
    s = em.mr_scores(["name[Blue Spice], eatType[pub]", "name[X]"],
                     [["eatType[pub], name[Blue Spice]"], ["name[Y], area[riverside]"]])
    assert s["slot_precision"] == pytest.approx(200 / 3) and s["slot_recall"] == pytest.approx(50)
    assert s["slot_f1"] == pytest.approx(400 / 7) and s["exact_mr"] == 50
    assert em.mr_scores([""], [["name[A]"]]) == {"slot_f1": 0, "slot_precision": 0, "slot_recall": 0, "exact_mr": 0}


def test_the_parsing_task_is_scored_by_slots_and_texts_by_the_five_metrics():
    """Every MR of the shipped test split is an MR to is_mr, none of its 4,693 texts is."""
    rows = read_rows(read_sources(None)["test"], "test")  # MR and text per row
    assert all(em.is_mr(mr) for mr, _ in rows) and not any(em.is_mr(text) for _, text in rows)
    s = em.scores([mr for mr, _ in rows[:50]], [[mr] for mr, _ in rows[:50]])
    assert set(s) == set(em.MR_METRICS) and s["exact_mr"] == 100 and s["slot_f1"] == pytest.approx(100)
    assert "bleu" in em.scores([t for _, t in rows[:5]], [[t] for _, t in rows[:5]], warn=False)
    assert "slot F1 100.00" in em.format_scores(s)


from hypothesis import given, settings, strategies as st  # noqa: E402

WORDS = st.text(alphabet="abcdefgh £0123456789-", min_size=1, max_size=8).map(str.strip).filter(bool)
MRS = st.lists(st.tuples(st.sampled_from(["name", "eatType", "food", "area", "near"]), WORDS), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(MRS, MRS), min_size=1, max_size=5), st.randoms())
def test_mr_scores_on_generated_mrs(pairs, rng):
    """In [0, 100]; 100 everywhere for a prediction that is its reference in any order; F1 the harmonic
    mean of precision and recall; exact only where the pair sets are equal."""
    text = lambda mr: ", ".join(f"{a}[{v}]" for a, v in mr)
    predictions, references = [text(p) for p, _ in pairs], [[text(r)] for _, r in pairs]
    s = em.mr_scores(predictions, references)
    assert all(0 <= s[m] <= 100 + 1e-9 for m in em.MR_METRICS)
    p, r = s["slot_precision"], s["slot_recall"]
    assert s["slot_f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0)
    assert s["exact_mr"] == pytest.approx(100 * sum(set(a) == set(b) for a, b in pairs) / len(pairs))
    shuffled = [text(rng.sample(r, len(r))) for _, r in pairs]
    assert all(v == pytest.approx(100) for v in em.mr_scores(shuffled, references).values())
    assert all(em.is_mr(t) for t in predictions)
