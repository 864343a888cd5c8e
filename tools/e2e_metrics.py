"""
The five official E2E NLG Challenge metrics, computed as the challenge's scorer does
(github.com/tuetschek/e2e-metrics, measure_scores.py with its defaults), on predictions and references
given as lists of strings (one prediction per MR; each MR's references, 1 to 45 of them):

    BLEU     sacrebleu, set up as mteval-v13a: 13a tokens, lowercased, clipped n-grams up to 4, the
             closest reference length for the brevity penalty.
    NIST     mteval-v13a's NIST, written out below (no maintained package computes it the same way).
    METEOR   METEOR 1.5 (-l en -norm), the jar that pycocoevalcap ships.            needs Java
    ROUGE-L  pycocoevalcap's ROUGE-L: LCS precision and recall, each the maximum over the references,
             combined with beta = 1.2, after the Stanford PTB tokenizer.            needs Java
    CIDEr    pycocoevalcap's CIDEr (not CIDEr-D), idf over this set's references.   needs Java

BLEU, METEOR and ROUGE-L are given on the papers' 0-100 scale, NIST and CIDEr as they are, so a table
reads like the LoRA paper's (BLEU 70.4, NIST 8.85, METEOR 46.8, ROUGE-L 71.8, CIDEr 2.53 for GPT-2
Medium + LoRA). The official scorer prints BLEU, METEOR and ROUGE-L on 0-1: 0.7040 is our 70.40.

tests/test_e2e_metrics.py pins all five on a case scored by the official tool (every test MR with at
least two references, its first reference as the prediction and the others as references): BLEU 0.6046,
NIST 8.9029, METEOR 0.4563, ROUGE_L 0.6381, CIDEr 1.8572.

Without a Java runtime the last three are left out, with one line that says how to get them
(Debian/Ubuntu: `apt-get install default-jre-headless`); BLEU and NIST need nothing but Python.
"""
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

NIST_MAX_N = 5  # NIST sums the information of matched 1- to 5-grams
NIST_INFO_N = 9  # mteval-v13a counts reference n-grams up to 9 for the information weights
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
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

def mteval_tokens(text):
    """mteval-v13a's default tokenization, lowercased: sacrebleu's 13a tokenizer is a port of it."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()(text.lower()).split()


def bleu(predictions, references):
    """Corpus BLEU, 0-100. sacrebleu reads references as streams (stream j = every MR's j-th reference);
    an MR with fewer references gets None there, which sacrebleu leaves out of that MR (an empty string
    would count as a reference of length 0 in the brevity penalty)."""
    from sacrebleu.metrics import BLEU
    most = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(most)]
    return BLEU(lowercase=True).corpus_score(predictions, streams).score


def ngram_counts(words, max_n):
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def nist(predictions, references):
    """mteval-v13a's NIST score (5-grams), corpus level.

    Each n-gram has an information weight from all the reference sentences together:
    info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), and for a word, log2(all words / count(w)).
    NIST = sum over n = 1..5 of (the summed info of the prediction's n-grams that a reference also has,
    each counted at most as often as in the reference that has it most) / (the prediction's n-grams),
    times a length penalty exp(-beta * ln(ratio)^2) for ratio = prediction words / average reference
    words below 1, with beta such that a ratio of 2/3 costs half (mteval: score_x 0.5 at ratio_x 1.5).

    The average reference length is mteval's: all reference words / the number of reference sets. The
    official scorer writes as many reference sets as the MR with the most references has (45 on the
    test set; the other MRs' extra slots are empty), so on E2E the penalty is 1 in practice."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} sets of references")
    ref_words = [[mteval_tokens(r) for r in refs] for refs in references]
    counts = Counter()
    for refs in ref_words:
        for words in refs:
            counts.update(ngram_counts(words, NIST_INFO_N))
    total_words = sum(len(w) for refs in ref_words for w in refs)

    def info(ngram):
        context = counts[ngram[:-1]] if len(ngram) > 1 else total_words
        return math.log2(context / counts[ngram])

    matched_info, hyp_ngrams = [0.0] * (NIST_MAX_N + 1), [0] * (NIST_MAX_N + 1)
    hyp_words = 0
    for pred, refs in zip(predictions, ref_words):
        words = mteval_tokens(pred)
        hyp_words += len(words)
        for n in range(1, NIST_MAX_N + 1):
            hyp_ngrams[n] += max(0, len(words) - n + 1)
        most = Counter()  # each n-gram's largest count in one reference
        for r in refs:
            most |= ngram_counts(r, NIST_MAX_N)
        for ngram, c in ngram_counts(words, NIST_MAX_N).items():
            if ngram in most:
                matched_info[len(ngram)] += info(ngram) * min(c, most[ngram])
    score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, NIST_MAX_N + 1))
    reference_sets = max(len(refs) for refs in references)
    ratio = hyp_words / (total_words / reference_sets)
    return score * nist_length_penalty(ratio)


def nist_length_penalty(ratio):
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
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    flat = predictions + [r for refs in references for r in refs]  # one tokenizer run for everything
    tokens = ptb_tokenize(flat)
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts, k = {}, len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[k:k + len(refs)]
        k += len(refs)
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
    scores = {"bleu": bleu(predictions, references), "nist": nist(predictions, references)}
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


def format_scores(scores):
    """'BLEU 60.46, NIST 8.9029, ...' in METRICS order, for the metrics present."""
    return ", ".join(f"{NAMES[m]} {scores[m]:.4f}" if m in ("nist", "cider") else f"{NAMES[m]} {scores[m]:.2f}"
                     for m in METRICS if m in scores)
