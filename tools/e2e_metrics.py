"""
The five official E2E NLG Challenge metrics, computed as the challenge's scorer does
(github.com/tuetschek/e2e-metrics, measure_scores.py with its defaults), on predictions and references
given as lists of strings (one prediction per MR; each MR's references, 1 to 45 of them):

    BLEU     mteval-v13a's (the Perl script the scorer runs), written out below: its tokenization,
             lowercased, clipped n-grams up to 4, the closest reference length for the brevity penalty.
    NIST     mteval-v13a's NIST (5-grams), written out below, its length penalty included.
    METEOR   METEOR 1.5 (-l en -norm), the jar that pycocoevalcap ships.            needs Java
    ROUGE-L  pycocoevalcap's ROUGE-L: LCS precision and recall, each the maximum over the references,
             combined with beta = 1.2, after the Stanford PTB tokenizer.            needs Java
    CIDEr    pycocoevalcap's CIDEr (not CIDEr-D), idf over this set's references.   needs Java

BLEU, METEOR and ROUGE-L are given on the papers' 0-100 scale, NIST and CIDEr as they are, so a table
reads like the LoRA paper's (BLEU 70.4, NIST 8.85, METEOR 46.8, ROUGE-L 71.8, CIDEr 2.53 for GPT-2
Medium + LoRA). The official scorer prints BLEU, METEOR and ROUGE-L on 0-1: 0.7040 is our 70.40.

tests/test_e2e_metrics.py checks all five against the official tool's figures on 27 prediction files
(tests/fixtures/e2e_official; docs/metrics.md has the agreement table) and on the leave-one-out case
(every test MR with at least two references, its first reference as the prediction and the others as
references): BLEU 0.6046, NIST 8.9029, METEOR 0.4563, ROUGE_L 0.6381, CIDEr 1.8572.

The parsing task (text -> MR, data/e2e/prepare.py --reverse) has references that are MRs, not texts:
`scores` gives it slot precision, recall and F1 over the attribute[value] pairs, and the share of exact
MRs, instead (mr_scores).

Without a Java runtime the last three are left out, with one line that says how to get them
(Debian/Ubuntu: `apt-get install default-jre-headless`); BLEU and NIST need nothing but Python.
"""
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
MR_METRICS = ("slot_f1", "slot_precision", "slot_recall", "exact_mr")  # the parsing task's (mr_scores)
NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
         "slot_f1": "slot F1", "slot_precision": "slot precision", "slot_recall": "slot recall", "exact_mr": "exact MR"}
JAVA_HINT = ("METEOR, ROUGE-L and CIDEr need a Java runtime (the official METEOR and PTB-tokenizer jars): "
             "install one, e.g. `apt-get install default-jre-headless`, and pip install pycocoevalcap==1.2")


# ---- the official file layout ---------------------------------------------------------------

def parse_predictions(text):
    """One prediction per line, each stripped, as the official scorer reads them."""
    return [line.strip() for line in text.splitlines()]


def parse_references(text):
    """Each MR's references on consecutive lines, an empty line between MRs -> a list of lists."""
    groups = [[]]
    for line in text.splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:  # a second empty line in a row does not start an MR with no references
            groups.append([])
    return groups if groups[-1] else groups[:-1]


# ---- BLEU and NIST (mteval-v13a) ------------------------------------------------------------
# The official scorer runs the Perl mteval-v13a-sig.pl on SGML files it writes (measure_scores.py,
# create_mteval_file): reference set j holds every MR's j-th reference, so there are as many sets as the
# MR with the most references has (45 on the test set), and an MR with fewer references gets empty
# segments in the rest. mteval then skips the empty ones: they add no n-grams, no words and no length,
# and its -sig variant counts only non-empty references when it averages the reference length for NIST.
# So below each MR simply has its own list of references.

BLEU_MAX_N = 4
NIST_MAX_N = 5  # NIST sums the information of matched 1- to 5-grams
ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
MTEVAL_RULES = [(re.compile(p), r) for p, r in (
    (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),  # punctuation and symbols (not ' - . ,)
    (r"([^0-9])([\.,])", r"\1 \2 "),  # a period or comma, unless after a digit
    (r"([\.,])([^0-9])", r" \1 \2"),  # ... or unless before a digit
    (r"([0-9])(-)", r"\1 \2 "))]  # a dash after a digit


def mteval_tokens(text):
    """mteval-v13a's default tokenization (its `tokenization`, without -c): SGML entities decoded,
    lowercased (ASCII letters only, as Perl's tr/A-Z/a-z/: "É" stays "É"), punctuation split off, but
    not a period or comma next to a digit, nor a dash unless after a digit."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} ".translate(ASCII_LOWER)
    for pattern, replacement in MTEVAL_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def ngram_counts(words, max_n):
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def closest_length(refs, hyp_len):
    """The reference length closest to the prediction's, the shorter one on a tie (mteval's default)."""
    return min((len(r) for r in refs), key=lambda n: (abs(n - hyp_len), n))


def information_weights(ref_words):
    """info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all references, for a word
    log2(all reference words / count(w)): rare continuations carry more information.

    Perl's quirk kept: mteval tests the context "w1..wn-1" for truth, and Perl's string "0" is false, so
    a bigram that starts with the token "0" is weighed like a word (E2E's references have no such token)."""
    counts = Counter()
    for words in ref_words:
        counts.update(ngram_counts(words, NIST_MAX_N))
    total = sum(map(len, ref_words))
    return {g: math.log2((counts[g[:-1]] if len(g) > 1 and g[:-1] != ("0",) else total) / c) for g, c in counts.items()}


def mteval(predictions, references):
    """{"bleu": 0-100, "nist"}: mteval-v13a-sig's corpus BLEU and NIST, as the official scorer runs it.

    Per MR the prediction's n-grams are matched against its references, each n-gram counted at most as
    often as in the reference that has it most.
    BLEU: the geometric mean of the matched shares of 1- to 4-grams, times exp(min(0, 1 - r/c)), c the
      predictions' words, r the sum of each MR's reference length closest to its prediction's. A share
      with no match counts 1 / (2^k total) for the k-th such n (mteval's smoothing); an n with no n-grams
      in any prediction counts 1.
    NIST: the sum over n = 1..5 of the matched n-grams' information (information_weights) / all the
      predictions' n-grams, times the length penalty at the ratio of the predictions' words to the MRs'
      count times the average reference length (all reference words / all references). The penalty
      bites on short outputs: on the 630 test MRs, the first half of each MR's first reference scores
      1.6983 (as the official scorer), the whole reference 14.2365 (tests/fixtures/e2e_official)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} sets of references")
    ref_words = [[mteval_tokens(r) for r in refs] for refs in references]
    ref_words = [[w for w in refs if w] for refs in ref_words]  # mteval skips a reference with no words
    info = information_weights([w for refs in ref_words for w in refs])
    top = max(BLEU_MAX_N, NIST_MAX_N)
    matched, total, matched_info = [0] * (top + 1), [0] * (top + 1), [0.0] * (top + 1)
    hyp_len = closest = 0
    for pred, refs in zip(predictions, ref_words):
        words = mteval_tokens(pred)
        hyp_len += len(words)
        closest += closest_length(refs, len(words)) if refs else 0
        most = Counter()  # each n-gram's largest count in one reference
        for r in refs:
            most |= ngram_counts(r, top)
        for n in range(1, top + 1):
            total[n] += max(0, len(words) - n + 1)
        for gram, c in ngram_counts(words, top).items():
            if gram in most:
                matched[len(gram)] += min(c, most[gram])
                matched_info[len(gram)] += info[gram] * min(c, most[gram])
    n_refs = sum(map(len, ref_words))
    ref_len = sum(len(w) for refs in ref_words for w in refs)
    mean_ref_len = ref_len / n_refs if n_refs else 0.0
    nist_score = sum(matched_info[n] / max(total[n], 1) for n in range(1, NIST_MAX_N + 1))
    nist_score *= nist_length_penalty(hyp_len / (len(predictions) * mean_ref_len)) if mean_ref_len else 0.0
    return {"bleu": 100 * bleu_from_counts(matched, total, hyp_len, closest), "nist": nist_score}


def bleu_from_counts(matched, total, hyp_len, ref_len):
    if hyp_len == 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, BLEU_MAX_N + 1):
        if total[n] == 0:
            continue  # log(1)
        if matched[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * total[n]))
        else:
            log_sum += math.log(matched[n] / total[n])
    return math.exp(min(0.0, 1 - ref_len / hyp_len) + log_sum / BLEU_MAX_N)


def bleu(predictions, references):
    """Corpus BLEU, 0-100, as mteval-v13a (see mteval)."""
    return mteval(predictions, references)["bleu"]


def nist(predictions, references):
    """Corpus NIST (5-grams), as mteval-v13a, length penalty included (see mteval)."""
    return mteval(predictions, references)["nist"]


def nist_length_penalty(ratio):
    """mteval's exp(-beta ln(ratio)^2) for a ratio below 1, beta such that a ratio of 2/3 costs half
    (its ratio_x 1.5, score_x 0.5); 1 at and above 1, 0 at 0."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


# ---- METEOR, ROUGE-L and CIDEr (pycocoevalcap, Java) ----------------------------------------

def java_missing():
    """None when the Java-based metrics can run, else the one line that says what to install."""
    if shutil.which("java") is None:
        return JAVA_HINT
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return JAVA_HINT
    return None


def ptb_tokenize(texts):
    """The Stanford PTB tokenizer as pycocoevalcap runs it (-preserveLines -lowerCase, then its list of
    punctuation tokens dropped), on a list of strings. The same jar and flags as its PTBTokenizer, with
    the temporary file in a temporary folder rather than inside site-packages (which may be read-only)."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(" ".join(t.split()) for t in texts))  # one line each, whatever whitespace they hold
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", path], capture_output=True, check=True).stdout.decode("utf-8")
    lines = out.split("\n")
    if len(lines) == len(texts) + 1 and lines[-1] == "":
        lines.pop()  # the newline after the last line
    if len(lines) != len(texts):  # never score a prediction against another MR's references
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS) for line in lines]


@functools.lru_cache(maxsize=None)
def meteor():
    """The METEOR 1.5 jar, started once per process: it spends ~15 s loading its paraphrase table, and
    compare.py scores 18 runs. It ends with the process."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def coco_metrics(predictions, references):
    """{"meteor", "rouge_l", "cider"} as pycocoevalcap computes them, METEOR and ROUGE-L on 0-100."""
    tokens = ptb_tokenize(predictions + [r for refs in references for r in refs])  # one tokenizer run for all
    return coco_scores(tokens[:len(predictions)], split_like(tokens[len(predictions):], references))


def split_like(flat, groups):
    """flat, a list as long as all the groups together, cut into lists of the groups' lengths."""
    out, k = [], 0
    for g in groups:
        out.append(flat[k:k + len(g)])
        k += len(g)
    return out


def coco_scores(prediction_tokens, reference_tokens):
    """coco_metrics on texts that ptb_tokenize has already tokenized (one string per text)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [p] for i, p in enumerate(prediction_tokens)}
    gts = dict(enumerate(reference_tokens))
    return {"meteor": 100 * meteor().compute_score(gts, res)[0], "rouge_l": 100 * float(Rouge().compute_score(gts, res)[0]),
            "cider": float(Cider().compute_score(gts, res)[0])}


# ---- all five --------------------------------------------------------------------------------

def e2e_scores(predictions, references, warn=True):
    """All five official metrics: {"bleu", "nist", "meteor", "rouge_l", "cider"}; without Java the last
    three are left out and, with warn, one line on stderr says how to get them."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} MRs' references")
    if not predictions or any(not refs for refs in references):
        raise ValueError("every MR needs at least one reference, and there must be at least one MR")
    scores = mteval(predictions, references)
    missing = java_missing()
    if not missing:
        try:
            scores.update(coco_metrics(predictions, references))
        except (OSError, subprocess.CalledProcessError) as e:  # a Java that is there but does not run
            detail = (getattr(e, "stderr", None) or b"").decode("utf-8", "replace").strip().splitlines()
            missing = f"METEOR, ROUGE-L and CIDEr were skipped: java failed ({detail[0] if detail else e})"
    if missing and warn:
        print(f"note: {missing}", file=sys.stderr)
    return scores


# ---- the parsing task: text -> MR ------------------------------------------------------------

MR_PAIR = re.compile(r"([^,\[\]]+)\[([^\[\]]*)\]")  # attribute[value], e.g. eatType[coffee shop]


def mr_slots(text):
    """The set of (attribute, value) pairs of an MR, each stripped: "name[Blue Spice], eatType[pub]" ->
    {("name", "Blue Spice"), ("eatType", "pub")}. Text that is no attribute[value] adds no pair."""
    return {(a.strip(), v.strip()) for a, v in MR_PAIR.findall(text)}


def is_mr(text):
    """Whether text is an MR and nothing else: attribute[value] pairs joined by commas."""
    parts = [p.strip() for p in text.split("],")]
    return all(MR_PAIR.fullmatch(p if p.endswith("]") else p + "]") for p in parts)


def mr_scores(predictions, references):
    """The parsing task's scores, 0-100: slot precision, recall and F1 over every prediction's
    attribute[value] pairs (summed over the set: micro-averaged), and exact MR, the share of predictions
    whose pairs are exactly a reference's. With several references a prediction counts against the one
    it shares most pairs with (E2E's reversed task has one: each sentence's MR)."""
    if len(predictions) != len(references) or not predictions or any(not refs for refs in references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references (every one needs at least one)")
    found = wanted = matched = exact = 0
    for prediction, refs in zip(predictions, references):
        got = mr_slots(prediction)
        ref = max((mr_slots(r) for r in refs), key=lambda pairs: (len(got & pairs), -len(pairs)))
        found, wanted, matched, exact = found + len(got), wanted + len(ref), matched + len(got & ref), exact + (got == ref)
    precision, recall = 100 * matched / max(found, 1), 100 * matched / max(wanted, 1)
    return {"slot_f1": 2 * precision * recall / max(precision + recall, 1e-12), "slot_precision": precision,
            "slot_recall": recall, "exact_mr": 100 * exact / len(predictions)}


def scores(predictions, references, warn=True):
    """What a task is scored by: mr_scores when every reference is an MR (the parsing task), else the
    five E2E metrics (e2e_scores)."""
    if references and all(is_mr(r) for refs in references for r in refs):
        return mr_scores(predictions, references)
    return e2e_scores(predictions, references, warn)


def format_scores(scores):
    """'BLEU 60.46, NIST 8.9029, ...' in METRICS order (then MR_METRICS), for the metrics present."""
    return ", ".join(f"{NAMES[m]} {scores[m]:.4f}" if m in ("nist", "cider") else f"{NAMES[m]} {scores[m]:.2f}"
                     for m in METRICS + MR_METRICS if m in scores)
