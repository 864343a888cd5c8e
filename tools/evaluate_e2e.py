"""
Evaluate a fine-tuned GPT-2 on the E2E NLG Challenge: decode one text per meaning representation (MR),
score it against all of that MR's references, and write the files the official scorer reads.

    python data/e2e/prepare.py     # once: writes data/e2e/test_refs.json
    python tools/evaluate_e2e.py --out_dir out-e2e                  # beam 10, as in the LoRA and ShareLoRA papers
    python tools/evaluate_e2e.py --out_dir out-e2e --beam_size 1 --limit 50   # greedy, a quick look
    python tools/evaluate_e2e.py --adapter parse.safetensors --data_dir data/e2e_parse --beam_size 1 --limit 630
                                   # the parsing task (text -> MR): slot F1 and exact MR instead

The prompt is the training context, MR + " ||" (see data/e2e/prepare.py); the model writes " " + text
and then <|endoftext|>. The test split has 630 MRs with 4,693 references (1 to 45 per MR, most have 6).

Decoding follows the LoRA paper's E2E recipe (microsoft/LoRA, examples/NLG/src/gpt2_beam.py): beam
search with 10 beams, a length penalty and no repeated 4-gram. The scores are the E2E challenge's five,
computed as its official scorer does (e2e_metrics.py): BLEU, NIST, METEOR, ROUGE-L and CIDEr, the last
three with Java. Files in the official layout, written anywhere, are scored the same way without a model:

    python tools/evaluate_e2e.py --predictions predictions.txt --references references.txt
"""
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: the project's modules
sys.path.insert(0, ROOT)
from data.common import TEXT, Bound, Parser, check, prepare_command, quiet_ctrl_c, read_meta, write_text
from train_options import BOUNDS
from data.common import run as run_early


def options(argv):
    """The command line, checked before torch loads (a mistake shows at once)."""
    p = Parser(prog="evaluate_e2e.py", description="Decode the E2E test MRs and score them with the official metrics.")
    p.add_argument("--out_dir", type=TEXT, help="a training run's folder (its adapter.safetensors or model)")
    p.add_argument("--predictions", type=TEXT, help="score this file (one text per line) instead of decoding; needs --references")
    p.add_argument("--references", type=TEXT, help="with --predictions: each MR's references on consecutive lines, a blank line between MRs")
    p.add_argument("--adapter", type=TEXT, help="an adapter file, instead of out_dir's")
    p.add_argument("--bank", type=TEXT, help="an adapter bank (bank.py): every task of --tasks decodes its test prompts, "
                   "all tasks in mixed batches; results in RESULTS_DIR/TASK")
    p.add_argument("--tasks", type=TEXT, help="with --bank: the tasks to evaluate, NAME (its prompts from --data_dir) or "
                   "NAME=DATA_DIR each, e.g. e2e,parse=data/e2e_parse (default: all of the bank's, on --data_dir)")
    p.add_argument("--init_from", type=TEXT, help="the base, instead of the one the adapter or bank names (e.g. "
                   "when it was moved away from it)")
    p.add_argument("--data_dir", type=TEXT, default="data/e2e", help="where data/e2e/prepare.py wrote its files")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--beam_size", type=Bound(int, 1, 100, what="a whole number in [1, 100] (the papers use 10; "
                   "beams beyond 100 cost memory for nothing, and it must be at most the vocabulary size)"), default=10, help="1: greedy decoding, batched")
    p.add_argument("--length_penalty", type=Bound(float, -10, 10), default=0.9, help="beam search only (greedy ignores it)")
    p.add_argument("--no_repeat_ngram_size", type=Bound(int, 0, 1024), default=4,
                   help="0: allow repeats; beam search only (greedy ignores it)")
    p.add_argument("--max_new_tokens", type=Bound(int, 1, 2**20), default=64, help="99%% of the test references are under 50 tokens")
    p.add_argument("--limit", type=Bound(int, 1, 10**7), help="only the first N prompts (a quick look)")
    p.add_argument("--batch_size", type=Bound(int, 1, 2**16), default=32,
                   help="prompts decoded together (beam search: each with beam_size rows in the batch)")
    p.add_argument("--device", type=BOUNDS["device"], default="auto")
    p.add_argument("--dtype", type=BOUNDS["dtype"], default="auto")
    p.add_argument("--quantize", default="auto", choices=("auto", "none", "nf4", "int8"),
                   help="auto (default): as the adapter was trained, which its file records; none, nf4 or int8 (quantize.py)")
    p.add_argument("--results_dir", type=TEXT, help="where to write the files (default: OUT_DIR/e2e_SPLIT)")
    args = p.parse_args(argv)
    check((args.predictions is None) == (args.references is None), "--predictions and --references go together: "
          "pass both files to score them, or neither to decode a model's")
    check(args.predictions is None or (args.out_dir is None and args.adapter is None and args.bank is None
                                       and args.limit is None and args.init_from is None),
          "--predictions scores a file without a model: leave out --out_dir, --adapter, --bank, --init_from and --limit")
    check(args.results_dir is None or not os.path.isfile(args.results_dir),
          f"--results_dir {args.results_dir} is a file, not a folder: choose a folder name")
    check(args.predictions is not None or args.out_dir is not None or args.adapter is not None or args.bank is not None,
          "pass --out_dir (a training run's folder), --adapter FILE or --bank FILE, or --predictions and --references "
          "to score files")
    check(args.bank is None or (args.out_dir is None and args.adapter is None and args.predictions is None),
          "--bank holds its own adapters: leave out --out_dir, --adapter and --predictions")
    check(args.tasks is None or args.bank is not None, "--tasks chooses tasks of a --bank: give the bank file too")
    items = [item.partition("=") for item in (args.tasks or "").split(",")] if args.tasks is not None else []
    check(all(name.strip() and (not eq or folder.strip()) for name, eq, folder in items),
          f"--tasks takes NAME or NAME=DATA_DIR items separated by commas (e.g. e2e,parse=data/e2e_parse), "
          f"not {args.tasks!r}")
    args.task_names = [name for name, _, _ in items] or None  # bank.load refuses a name given twice
    args.task_data = {name: folder or args.data_dir for name, _, folder in items}  # each task's prompts
    return args


def score_files(args):
    """--predictions and --references: files in the official layout, scored without a model or torch."""
    from data.common import decode_utf8
    from tools.e2e_metrics import format_scores, parse_predictions, parse_references, scores as score
    texts = {}
    for option in ("predictions", "references"):
        path = getattr(args, option)
        check(os.path.isfile(path), f"--{option} {path} is not a file")
        with open(path, "rb") as f:
            texts[option] = decode_utf8(f.read(), f"--{option} {path}")
    predictions, references = parse_predictions(texts["predictions"]), parse_references(texts["references"])
    check(references, f"--references {args.references} holds no reference")
    check(len(predictions) == len(references), f"--predictions {args.predictions} has {len(predictions)} lines but "
          f"--references {args.references} has {len(references)} MRs (groups of lines between blank lines): "
          "they must match one to one, in the same order")
    scores = score(predictions, references)
    print(f"{len(predictions)} MRs: {format_scores(scores)}")
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        write_text(os.path.join(args.results_dir, "scores.json"), json.dumps(
            {**scores, "mrs": len(predictions), "predictions": args.predictions, "references": args.references}, indent=1) + "\n")
    return scores


if __name__ == "__main__":
    quiet_ctrl_c()  # until main() runs: Ctrl-C while torch loads ends quietly
    early = run_early(options, sys.argv[1:])
    if early.predictions is not None:
        run_early(score_files, early)  # no model: torch is never loaded
        sys.exit(0)

import torch  # noqa: E402  (after the options were checked)
from torch.nn import functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import KVCache  # noqa: E402
from tools.e2e_metrics import format_scores, scores as score  # noqa: E402
from runtime import autocast, base_note, check_folder_target, fail, load_model, read_json, run, write_folder  # noqa: E402
from tokenizer import EOT, decode, get_tokenizer


# ---- decoding -------------------------------------------------------------------------------

def banned_tokens(seq, n):
    """The tokens that would complete an n-gram already present in seq: the next token after seq's last
    n-1 tokens wherever those n-1 tokens occurred before (fairseq's and Hugging Face's rule)."""
    if n <= 0 or len(seq) < n:
        return []
    prefix = seq[len(seq) - n + 1:]
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]


class Hypotheses:
    """One prompt's beam search: its live beams (new tokens and summed log-probs, float32) and the pool
    of finished hypotheses, best first, at most beam_size.

    Each step extends every live beam by every token and keeps the beam_size best sums of log-probs.
    A candidate ending in eos leaves for the pool, scored sum_logprob / length ** length_penalty with
    length = new tokens including the eos (Hugging Face and microsoft/LoRA both count it):
    length_penalty 0 ranks by total log-prob, which favours short texts; 1 by the mean per token. As in
    Hugging Face, an eos only counts when it is among the beam_size best candidates.

    Stopping rule, Hugging Face's default (early_stopping=False): stop once the pool is full and the
    best live beam, scored as if it ended now, does not beat the pool's worst. This is a heuristic:
    with length_penalty > 0 a longer text is divided by more and could still overtake. At
    max_new_tokens the live beams join the pool unfinished. Without the n-gram ban this gives
    transformers' generate(num_beams=..., early_stopping=False) token for token (a test checks).

    no_repeat_ngram_size bans n-grams repeated within the generated tokens only, as microsoft/LoRA's
    gpt2_beam.py does; Hugging Face also counts the prompt for a decoder-only model. On E2E that
    difference matters: the prompt holds the MR's values, and a text that copies "1 out of 5" or
    "Raja Indian Cuisine" with the MR's tokenization would be forbidden: 100 of the 4,672 validation
    references (11 of the test's) could not be generated under Hugging Face's rule."""

    def __init__(self, beam_size, length_penalty, no_repeat_ngram_size, eos_token):
        self.beam_size, self.length_penalty = beam_size, length_penalty
        self.no_repeat_ngram_size, self.eos_token = no_repeat_ngram_size, eos_token
        self.seqs = [[]]  # a single empty beam until the first step
        self.sums = [0.0]  # each live beam's summed log-prob
        self.pool = []  # (score, tokens)
        self.done = False

    def step(self, candidates, vocab, step, last):
        """Choose the next beams from `candidates`, the 2 x beam_size best (summed log-prob, index) pairs
        over every live beam and token, best first, index = parent * vocab + token (choose() finds them
        for all the searches at once). Returns (parents, tokens): each new beam is its parent's beam plus
        its token. Sets done when the search is over (the stopping rule, or `last`, the step at
        max_new_tokens). 2 x beam_size candidates: at most one eos per beam, so at least beam_size of
        them live on."""
        k = self.beam_size
        parents, tokens, live = [], [], []
        for rank, (total, i) in enumerate(candidates):
            parent, token = divmod(int(i), vocab)
            if token != self.eos_token:
                parents.append(parent)
                tokens.append(token)
                live.append(total)
            elif rank < k:  # finished: step + 1 new tokens, counting the eos
                self.pool.append((total / (step + 1) ** self.length_penalty, self.seqs[parent]))
                self.pool = sorted(self.pool, key=lambda h: h[0], reverse=True)[:k]
            if len(live) == k:
                break
        self.seqs = [self.seqs[p] + [t] for p, t in zip(parents, tokens)]
        self.sums = live
        if len(self.pool) == k and live[0] / (step + 1) ** self.length_penalty <= self.pool[-1][0]:
            self.done = True  # no live beam is expected to beat the worst finished one
        elif last:  # max_new_tokens reached: the live beams compete unfinished
            self.pool += [(total / (step + 1) ** self.length_penalty, seq) for total, seq in zip(live, self.seqs)]
            self.done = True
        return parents, tokens

    def best(self):
        return max(self.pool, key=lambda h: h[0])[1]


def next_log_probs(model, h):
    """Log-probs of the next token from the last position's hidden states h (rows, C), in float32 even
    under autocast: beam search ranks sums of them, and bfloat16 logits (8 bits of mantissa, steps of
    0.06 at a logit of 16) would tie or swap close candidates. One (rows x C) product: cheap."""
    with torch.autocast(h.device.type, enabled=False):
        return F.log_softmax(h.float() @ model.lm_head.weight.float().t(), dim=-1)


def choose(logp, searches, active, step, last):
    """One step of every active search at once, from logp (rows, vocab): the rows of active[0]'s beams
    first, then the next search's. Every search has the same number of live beams (1 at the first step,
    beam_size after), so one topk over (searches, beams x vocab) finds all the candidates and one copy
    brings them to the host: a GPU waits once per step, not once per prompt. The n-gram bans go in as
    one indexed write. -> each active search's (parents, tokens)."""
    first = searches[active[0]]
    n, vocab, device = len(first.seqs), logp.size(1), logp.device
    bans = [(i * n + b, t) for i, s in enumerate(active) for b, seq in enumerate(searches[s].seqs)
            for t in banned_tokens(seq, first.no_repeat_ngram_size)]
    if bans:
        logp[tuple(torch.tensor(bans, device=device).t())] = float("-inf")
    sums = torch.tensor([x for s in active for x in searches[s].sums], device=device)
    top, index = (sums[:, None] + logp).view(len(active), n * vocab).topk(2 * first.beam_size, dim=1)
    top, index = torch.stack((top.double(), index.double())).tolist()  # the one transfer; indices < 2**53 stay exact
    return [searches[s].step(list(zip(top[i], index[i])), vocab, step, last) for i, s in enumerate(active)]


@torch.no_grad()
def beam_search_batch(model, prompts, beam_size=10, max_new_tokens=64, length_penalty=0.9,
                      no_repeat_ngram_size=4, eos_token=EOT):
    """The best continuation of each prompt (lists of ids): its new tokens, without the eos. The live
    beams of all the prompts go through the model together, one token per beam per step through the KV
    cache; a prompt whose search is over leaves the batch (its cache rows with it). Prompts of different
    lengths are left-padded (KVCache's pad: no real token attends to padding, positions count from each
    prompt's start). Each prompt's result is what it would get alone, up to float rounding (Hypotheses
    decides; a test checks)."""
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    searches = [Hypotheses(beam_size, length_penalty, no_repeat_ngram_size, eos_token) for _ in prompts]
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    cache = KVCache(model.config.n_layer, longest + max_new_tokens, pad=pad if pad.any() else None)
    x = torch.tensor([[eos_token] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    active = list(range(len(prompts)))  # the searches still running, in the order of their cache rows
    with model.precision(device.type):
        for step in range(max_new_tokens):
            # the vocabulary projection of the last position only: the prompt's others are never used
            logp = next_log_probs(model, model.hidden(x, cache)[:, -1])  # (rows, vocab)
            chosen = choose(logp, searches, active, step, last=step == max_new_tokens - 1)
            rows, tokens, still, n = [], [], [], len(logp) // len(active)  # n: beams per search
            for i, (s, (parents, new)) in enumerate(zip(active, chosen)):
                if not searches[s].done:
                    still.append(s)
                    rows += [i * n + p for p in parents]  # each new beam takes its parent's keys and values
                    tokens += new
            if not still:
                break
            active = still
            cache.reorder(torch.tensor(rows, device=device))
            if getattr(model, "task_rows", None) is not None:  # a bank's mixed batch (bank.py): rows keep their task
                model.task_rows.reorder(torch.tensor(rows, device=device))
            x = torch.tensor(tokens, device=device)[:, None]  # (rows, 1)
    return [h.best() for h in searches]


@torch.no_grad()
def beam_search(model, prompt_ids, beam_size=10, max_new_tokens=64, length_penalty=0.9,
                no_repeat_ngram_size=4, eos_token=EOT, use_cache=True):
    """The best continuation of one prompt (see Hypotheses). use_cache=False recomputes the whole
    sequence every step instead of feeding one token per beam to the KV cache; the selection code is
    shared, so both must give the same tokens (a test checks)."""
    if use_cache:
        return beam_search_batch(model, [prompt_ids], beam_size, max_new_tokens, length_penalty,
                                 no_repeat_ngram_size, eos_token)[0]
    if max_new_tokens < 1:
        return []
    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    search = Hypotheses(beam_size, length_penalty, no_repeat_ngram_size, eos_token)
    with model.precision(device.type):
        for step in range(max_new_tokens):
            # the prompt, repeated for each beam, followed by that beam's tokens
            x = torch.cat((prompt.expand(len(search.seqs), -1),
                           torch.tensor(search.seqs, dtype=torch.long, device=device)), 1)
            choose(next_log_probs(model, model.hidden(x)[:, -1]), [search], [0], step, last=step == max_new_tokens - 1)
            if search.done:
                break
    return search.best()


def by_similar_length(prompts, batch_size):
    """Lists of at most batch_size prompt numbers, shortest first: beam search batches prompts of
    similar lengths, left-padded (the 100 first test MRs make 4 batches of 32 instead of 22 of one
    length each, which at 1 to 12 prompts read every weight for a few rows)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def by_length(prompts, batch_size):
    """Lists of at most batch_size prompt numbers, each of prompts of one length, shortest first: greedy
    decoding's batches, which model.generate takes without padding (beam search pads instead, see
    by_similar_length). The 630 test prompts have 36 distinct lengths (16 to 52 tokens)."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for _, members in sorted(groups.items()):
        for s in range(0, len(members), batch_size):
            yield members[s:s + batch_size]


@torch.no_grad()
def greedy_batch(model, prompts, max_new_tokens=64, eos_token=EOT, batch_size=32, progress=None, tasks=None):
    """Greedy continuations of many prompts (lists of ids), batched by length (by_length): the 630 test
    prompts make 44 batches of at most 32. Returns the new tokens of each prompt, in the given order,
    cut before the first eos. `progress` (a tqdm bar) is advanced by the prompts done. tasks: each
    prompt's task, for a model carrying a bank (bank.py)."""
    device = next(model.parameters()).device
    out = [None] * len(prompts)
    for chunk in by_length(prompts, batch_size):
        idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
        with rows_of_tasks(model, tasks, chunk):
            rows = model.generate(idx, max_new_tokens, temperature=0, eos_token=eos_token)[:, idx.size(1):].tolist()
        for i, row in zip(chunk, rows):
            out[i] = row[:row.index(eos_token)] if eos_token in row else row
        if progress is not None:
            progress.update(len(chunk))
    return out


def rows_of_tasks(model, tasks, chunk):
    """bank.tasks for the prompts `chunk` of a mixed batch; nothing without tasks."""
    if tasks is None:
        return contextlib.nullcontext()
    import bank
    return bank.tasks(model, [tasks[i] for i in chunk])


# ---- the official files --------------------------------------------------------------------------------

def one_line(text):
    """A text as one line with single spaces: the official files have one text per line."""
    return " ".join(text.split())


def write_official_layout(out_dir, predictions, groups):
    """Write the two files of e2e-metrics' `./measure_scores.py references.txt predictions.txt`:
    predictions.txt, one text per line, and references.txt, each MR's references on consecutive lines
    with an empty line between MRs. groups are test_refs.json's {"mr", "refs"} entries, in the order
    of the predictions. Returns the two paths."""
    if len(predictions) != len(groups):
        raise ValueError(f"{len(predictions)} predictions for {len(groups)} MRs")
    os.makedirs(out_dir, exist_ok=True)
    pred_path, ref_path = os.path.join(out_dir, "predictions.txt"), os.path.join(out_dir, "references.txt")
    write_text(pred_path, "".join(one_line(p) + "\n" for p in predictions))
    write_text(ref_path, "\n".join("".join(one_line(r) + "\n" for r in g["refs"]) for g in groups))
    return pred_path, ref_path


# ---- the command line -----------------------------------------------------------------------

def room_to_generate(model, mrs, sep=" ||", max_new_tokens=64, split="test"):
    """max_new_tokens, or fewer when the longest prompt leaves less room in the model's context; an
    error when it leaves none."""
    longest = max(len(get_tokenizer().encode_ordinary(mr + sep)) for mr in mrs)
    check(longest < model.config.block_size, f"an MR of {split} is {longest} tokens, as long as the model's "
                                             f"context ({model.config.block_size}): it leaves no room to generate")
    return min(max_new_tokens, model.config.block_size - longest)


def decode_mrs(model, info, mrs, sep=" ||", beam_size=10, max_new_tokens=64, length_penalty=0.9,
               no_repeat_ngram_size=4, batch_size=32, tasks=None):
    """One sentence per MR: greedy (beam_size 1, batches of one prompt length) or beam search (batches of
    similar lengths, left-padded), with a tqdm bar. tasks: each MR's task, for a model carrying a bank."""
    enc = get_tokenizer()
    prompts = [enc.encode_ordinary(mr + sep) for mr in mrs]  # exactly the training contexts
    how = "greedy" if beam_size == 1 else f"beam {beam_size}"
    with autocast(info["device"], info["dtype"]), tqdm(total=len(prompts), desc=f"decoding ({how})", unit="MR") as bar:
        if beam_size == 1:
            outs = greedy_batch(model, prompts, max_new_tokens, EOT, batch_size, progress=bar, tasks=tasks)
        else:  # the beams of up to batch_size prompts of similar lengths at a time
            outs = [None] * len(prompts)
            for chunk in by_similar_length(prompts, batch_size):
                with rows_of_tasks(model, tasks, chunk):
                    found = beam_search_batch(model, [prompts[i] for i in chunk], beam_size, max_new_tokens,
                                              length_penalty, no_repeat_ngram_size, EOT)
                for i, tokens in zip(chunk, found):
                    outs[i] = tokens
                bar.update(len(chunk))
    return [one_line(decode(o)) for o in outs]


def read_references(data_dir, split, with_separator=False, task=None):
    """The {"mr", "refs"} groups of data_dir/<split>_refs.json, checked, (and the separator between MR
    and reference). meta.json is written last by prepare.py: without it the references may be a stale
    half of two preparations, so it is required. task: the task whose folder --tasks NAME=DATA_DIR made
    data_dir (the refusal then says so, not --data_dir)."""
    how = f"`{prepare_command(data_dir)}`"
    fix = f"run {how} (or pass --data_dir)" if task is None else f"prepare it for --tasks' task {task} ({how})"
    meta = read_meta(data_dir, fix)
    path = os.path.join(data_dir, f"{split}_refs.json")
    if not os.path.exists(path):
        fail(f"{path} does not exist: {fix}")
    groups = read_json(path, "references file")
    check(isinstance(groups, list) and groups and all(
        isinstance(g, dict) and isinstance(g.get("mr"), str) and isinstance(g.get("refs"), list) and g["refs"]
        and all(isinstance(r, str) for r in g["refs"]) for g in groups),
        f"{path} is not a list of {{\"mr\": text, \"refs\": [text, ...]}}: {fix} again")
    return (groups, meta.get("separator", " ||")) if with_separator else groups


def main(argv=None):
    args = options(argv)
    if args.predictions is not None:
        return score_files(args)
    # every data folder a task reads, before any model loads: (groups, separator) of its test prompts
    named = {folder: name for name, folder in args.task_data.items() if folder != args.data_dir}  # by --tasks
    data = {f: read_references(f, args.split, with_separator=True, task=named.get(f))
            for f in sorted(set(args.task_data.values()) or {args.data_dir})}
    data = {f: (groups[:args.limit], sep) for f, (groups, sep) in data.items()}
    results_dir = args.results_dir or os.path.join(args.out_dir or os.path.dirname(args.adapter or args.bank) or ".",
                                                   f"e2e_{args.split}")
    decode_and_score(args, data, results_dir)


RESULTS = ("predictions.txt", "references.txt", "scores.json")  # one set: written together, as one folder


def decode_and_score(args, data, results_dir):
    """data: {data folder: (groups, separator)}, every folder a task reads (args.task_data; --data_dir
    for a task that names none, and without a bank)."""
    if args.bank is not None:
        import bank
        model, info = bank.load(args.bank, args.task_names, init_from=args.init_from,
                                device=args.device, dtype=args.dtype, quantize=args.quantize)
    else:
        check_folder_target(results_dir, "--results_dir", RESULTS, "scores.json")  # before loading and decoding
        model, info = load_model(out_dir=args.out_dir, adapter=args.adapter, init_from=args.init_from, device=args.device,
                                 dtype=args.dtype, quantize=args.quantize)
    if info.get("quantize", "none") != info.get("trained_on", "none"):
        print(f"note: the base runs with{base_note(info)}", file=sys.stderr)
    check(args.beam_size <= model.config.vocab_size, f"--beam_size must be at most the vocabulary size "
                                                     f"({model.config.vocab_size}), not {args.beam_size}")
    names = info.get("tasks") or [None]  # a bank: every task decodes its own prompts, all in mixed batches
    folder = {name: args.task_data.get(name, args.data_dir) for name in names}
    groups = {name: data[folder[name]][0] for name in names}
    prompts = [g["mr"] + data[folder[n]][1] for n in names for g in groups[n]]  # MR + its separator
    max_new_tokens = room_to_generate(model, prompts, "", args.max_new_tokens, args.split)
    if args.bank is not None:  # results_dir holds a folder per task and nothing else; each checked first
        check_folder_target(results_dir, "--results_dir", names)
    for name in names if args.bank is not None else ():
        check_folder_target(os.path.join(results_dir, name), "--results_dir", RESULTS, "scores.json")
    predictions = decode_mrs(model, info, prompts, "", args.beam_size, max_new_tokens,
                             args.length_penalty, args.no_repeat_ngram_size, args.batch_size,
                             tasks=[n for n in names for _ in groups[n]] if names != [None] else None)
    for name in names:
        write_results(args, groups[name], predictions[:len(groups[name])], info,
                      results_dir if name is None else os.path.join(results_dir, name), name, folder[name])
        predictions = predictions[len(groups[name]):]


def write_results(args, groups, predictions, info, results_dir, task=None, data_dir=None):
    """Score the predictions (the five E2E metrics; slot F1 and exact MR when the references are MRs:
    data/e2e_parse), write them in the official layout and scores.json, print the scores."""
    scores = score(predictions, [g["refs"] for g in groups])

    settings = {k: getattr(args, k) for k in ("split", "beam_size", "length_penalty", "no_repeat_ngram_size",
                                              "max_new_tokens", "limit")}
    if args.beam_size == 1:  # greedy decoding applies neither: recorded as null, not as the defaults it ignored
        settings.update(length_penalty=None, no_repeat_ngram_size=None)

    def write(folder):  # the three files as one set: a kill or a full disk leaves the previous set whole
        write_official_layout(folder, predictions, groups)
        write_text(os.path.join(folder, "scores.json"), json.dumps(
            {**scores, "mrs": len(groups), **settings, "task": task, "data_dir": data_dir, "model": info}, indent=1,
            default=str) + "\n")

    write_folder(results_dir, write, "--results_dir", RESULTS, "scores.json")
    pred_path, ref_path = (os.path.join(results_dir, f) for f in RESULTS[:2])
    how = "greedy" if args.beam_size == 1 else f"beam {args.beam_size}"
    # prompts: E2E's are MRs, E2E reversed's (data/e2e_parse) sentences
    print(f"{args.split}{'' if task is None else f' ({task})'}: {len(groups)} prompts, {how}: {format_scores(scores)}")
    print(f"wrote {pred_path}, {ref_path} (the official scorer's layout) and scores.json")


if __name__ == "__main__":
    run(main)
