"""
evaluate_e2e.py on CPU with tiny random GPTs: beam search against greedy decoding, against itself
without the KV cache and against transformers' beam search; the n-gram ban; batched greedy decoding;
the official scorer's file layout; the CLI (the metrics themselves: test_e2e_metrics.py).

The decoding tests use a 64-token vocabulary and weights drawn with std 0.3 instead of GPT-2's 0.02:
the next-token distributions are then peaked (no near-ties, so float rounding cannot flip a choice)
and token 9, used as eos, ends about half of the generations early, so both ways a hypothesis can
finish are exercised.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import evaluate_e2e as ev  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

EOS = 9


def tiny_gpt(vocab_size=64, std=0.3, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, block_size=128))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine
    two threads waiting on each other made these tests 40x slower (30 s instead of 0.8 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4 + k % 5,), generator=g).tolist() for k in range(10)]


def greedy(model, prompt, n, eos=EOS):
    out = model.generate(torch.tensor([prompt]), n, temperature=0, eos_token=eos)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


def repeated_ngrams(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) - len(set(grams))


# ---- beam search ----------------------------------------------------------------------------

def test_beam_size_1_is_greedy(model, prompts):
    lengths = set()
    for prompt in prompts:
        for lp in (0.0, 0.9, 1.0):  # one beam: the length penalty cannot change anything
            out = ev.beam_search(model, prompt, beam_size=1, max_new_tokens=30, length_penalty=lp,
                                 no_repeat_ngram_size=0, eos_token=EOS)
            assert out == greedy(model, prompt, 30)
            lengths.add(len(out))
    assert 30 in lengths and min(lengths) < 30  # some ended with eos, some ran to max_new_tokens


@pytest.mark.parametrize("beam_size", [4, 5])
def test_kv_cache_and_full_recompute_agree(model, prompts, beam_size):
    lengths = []
    for prompt in prompts:
        kw = dict(beam_size=beam_size, max_new_tokens=30, length_penalty=0.9, no_repeat_ngram_size=4, eos_token=EOS)
        cached = ev.beam_search(model, prompt, **kw)
        assert cached == ev.beam_search(model, prompt, use_cache=False, **kw)
        lengths.append(len(cached))
    assert max(lengths) == 30 and min(lengths) < 30


def test_beam_search_matches_transformers(model, prompts, tmp_path):
    """The same weights in transformers' GPT2LMHeadModel, generate(num_beams=...) with its default
    early_stopping=False: the same tokens, for several beam sizes and length penalties. (No n-gram
    ban here: transformers also bans n-grams of the prompt, we do not; see beam_search.)"""
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(bos_token_id=EOS, eos_token_id=EOS)  # ids inside the 64-token vocabulary
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for prompt in prompts[:6]:
        for beam_size, lp in ((4, 0.9), (5, 1.0), (3, 0.0), (4, 2.0)):
            ours = ev.beam_search(model, prompt, beam_size=beam_size, max_new_tokens=30, length_penalty=lp,
                                  no_repeat_ngram_size=0, eos_token=EOS)
            with torch.no_grad():
                theirs = hf.generate(torch.tensor([prompt]), num_beams=beam_size, max_new_tokens=30,
                                     length_penalty=lp, early_stopping=False, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
            assert ours == (theirs[:theirs.index(EOS)] if EOS in theirs else theirs), (prompt, beam_size, lp)


def test_banned_tokens():
    assert ev.banned_tokens([1, 2, 3, 9, 1, 2], 3) == [3]  # "1 2" was followed by 3: "1 2 3" again is banned
    assert sorted(ev.banned_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3)) == [3, 4]
    assert ev.banned_tokens([1, 2, 3, 9, 1, 2], 4) == []  # "9 1 2" never occurred before
    assert ev.banned_tokens([5, 6, 5], 2) == [6]
    assert ev.banned_tokens([1, 2], 3) == [] and ev.banned_tokens([1, 1, 1], 0) == []


def test_no_repeat_ngram(model, prompts):
    """A random model loops: without the ban its 60-token texts repeat 4-grams, with it none do."""
    for prompt in prompts[:4]:
        free = ev.beam_search(model, prompt, beam_size=4, max_new_tokens=60, no_repeat_ngram_size=0, eos_token=None)
        banned = ev.beam_search(model, prompt, beam_size=4, max_new_tokens=60, no_repeat_ngram_size=4, eos_token=None)
        assert len(free) == len(banned) == 60
        assert repeated_ngrams(free, 4) > 0 and repeated_ngrams(banned, 4) == 0


def test_prompt_ngrams_are_not_banned(model, prompts):
    """The ban looks at the generated tokens only: a text may repeat a 4-gram of its prompt (on E2E the
    prompt is the MR, whose values the text should copy). Build prompts that end in the first 30 tokens
    of the model's own greedy text, and keep those whose greedy continuation repeats a 4-gram of that
    prompt before one of its own: one beam with no_repeat_ngram_size=4 must still follow it that far
    (transformers' rule, which counts the prompt, would leave it at the copied 4-gram)."""
    checked = 0
    for prompt in prompts:
        text = greedy(model, prompt, 80, eos=None)
        long_prompt, rest = prompt + text[:30], text[30:]
        # rest[:k]: the longest start of rest that repeats none of its own 4-grams
        k = next((k for k in range(4, len(rest) + 1) if repeated_ngrams(rest[:k], 4)), len(rest) + 1) - 1
        prompt_grams = {tuple(long_prompt[i:i + 4]) for i in range(len(long_prompt) - 3)}
        if not any(tuple(rest[i:i + 4]) in prompt_grams for i in range(k - 3)):
            continue
        out = ev.beam_search(model, long_prompt, beam_size=1, max_new_tokens=k, no_repeat_ngram_size=4, eos_token=None)
        assert out == rest[:k]
        checked += 1
    assert checked >= 3  # 4 of the 10 prompts qualify


@pytest.mark.parametrize("beam_size", [2, 5])
def test_beam_search_batch_matches_one_by_one(model, beam_size):
    """Seven prompts' beams through the model together give what each prompt gets alone without the KV
    cache; their searches end at different steps (an eos, the stopping rule or max_new_tokens), so
    prompts leave the batch while the others go on. Once with prompts of one length, once of lengths 2
    to 8 (left-padded in the batch)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (5,), generator=g).tolist() for _ in range(7)]
    mixed = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 2, 8, 5, 3, 7, 4)]
    lengths = set()
    for lp, n in ((0.9, 4), (0.0, 0), (1.0, 2)):
        kw = dict(beam_size=beam_size, max_new_tokens=20, length_penalty=lp, no_repeat_ngram_size=n, eos_token=EOS)
        for group in (prompts, mixed):
            batched = ev.beam_search_batch(model, group, **kw)
            assert batched == [ev.beam_search(model, p, use_cache=False, **kw) for p in group]
            lengths |= {len(o) for o in batched}
    assert len(lengths) > 2 and 20 in lengths


def test_left_padding_changes_no_logit(model):
    """A prompt's logits, through the cache, alone and left-padded beside a longer prompt: the same."""
    from model import KVCache
    a, b = [5, 9, 14], [3, 1, 4, 1, 5, 9, 2]
    alone = model(torch.tensor([a]), cache=KVCache(model.config.n_layer, 12))[0][0, -1]
    cache = KVCache(model.config.n_layer, 12, pad=torch.tensor([4, 0]))
    padded = model(torch.tensor([[EOS] * 4 + a, b]), cache=cache)[0]
    assert torch.allclose(padded[0, -1], alone, atol=1e-5)
    assert torch.allclose(padded[1, -1], model(torch.tensor([b]))[0][0, -1], atol=1e-5)
    step = model(torch.tensor([[7], [7]]), cache=cache)[0][:, -1]  # one more token each
    assert torch.allclose(step[0], model(torch.tensor([a + [7]]))[0][0, -1], atol=1e-5)
    assert torch.allclose(step[1], model(torch.tensor([b + [7]]))[0][0, -1], atol=1e-5)


def test_greedy_batch_matches_one_by_one(model):
    g = torch.Generator().manual_seed(2)
    lengths = [5, 3, 5, 7, 3, 5, 4, 3, 7, 5, 5]  # mixed, so groups of 1 to 5 prompts
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    outs = ev.greedy_batch(model, prompts, max_new_tokens=25, eos_token=EOS, batch_size=2, progress=bar)
    assert outs == [greedy(model, p, 25) for p in prompts]
    assert bar.n == len(prompts)
    assert any(len(o) < 25 for o in outs) and any(len(o) == 25 for o in outs)


# ---- scores ---------------------------------------------------------------------------------

GROUPS = [  # E2E-like: a variable number of references per MR
    {"mr": "name[The Vaults], eatType[pub]", "refs": ["The Vaults is a pub.", "The Vaults is a local pub.",
                                                     "There is a pub called The Vaults."]},
    {"mr": "name[Blue Spice], food[Chinese]", "refs": ["Blue Spice serves Chinese food."]},
    {"mr": "name[Zizzi], area[riverside]", "refs": ["Zizzi is by the riverside.", "Near the river is Zizzi."]},
]
REFS = [g["refs"] for g in GROUPS]


# ---- files ----------------------------------------------------------------------------------

def read_like_measure_scores(path, multi_ref):
    """e2e-metrics' measure_scores.read_lines: one instance per line, or in multi-ref mode
    consecutive lines per instance with empty lines between instances."""
    buf = [[]] if multi_ref else []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if multi_ref:
            if not line:
                buf.append([])
            else:
                buf[-1].append(line)
        else:
            buf.append(line)
    if multi_ref and not buf[-1]:
        del buf[-1]
    return buf


def test_write_official_layout(tmp_path):
    preds = ["The Vaults is a pub.", "Blue Spice serves\nChinese food.", "Zizzi is by the river."]
    pred_path, ref_path = ev.write_official_layout(tmp_path / "out", preds, GROUPS)
    assert Path(ref_path).read_text() == (
        "The Vaults is a pub.\nThe Vaults is a local pub.\nThere is a pub called The Vaults.\n"
        "\n"
        "Blue Spice serves Chinese food.\n"
        "\n"
        "Zizzi is by the riverside.\nNear the river is Zizzi.\n")
    assert Path(pred_path).read_text() == ("The Vaults is a pub.\nBlue Spice serves Chinese food.\n"
                                           "Zizzi is by the river.\n")  # the newline became a space
    assert read_like_measure_scores(ref_path, multi_ref=True) == REFS
    assert len(read_like_measure_scores(pred_path, multi_ref=False)) == len(GROUPS)
    with pytest.raises(ValueError):
        ev.write_official_layout(tmp_path, preds[:2], GROUPS)


# ---- the command line -----------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "e2e"
    d.mkdir()
    (d / "test_refs.json").write_text(json.dumps(GROUPS))
    (d / "meta.json").write_text(json.dumps({"kind": "examples", "separator": " ||"}))
    return d


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cli(data_dir, tmp_path, monkeypatch, capsys, beam_size):
    """The whole script with load_model stubbed by a tiny GPT over GPT-2's full vocabulary."""
    calls = []

    def fake_load_model(**kwargs):
        calls.append(kwargs)
        return tiny_gpt(vocab_size=50257, std=0.02), {"device": "cpu", "dtype": torch.float32}

    monkeypatch.setattr(ev, "load_model", fake_load_model)
    out_dir = tmp_path / "run"
    ev.main(["--out_dir", str(out_dir), "--data_dir", str(data_dir), "--beam_size", str(beam_size),
             "--max_new_tokens", "6", "--limit", "2", "--device", "cpu"])
    assert calls == [dict(out_dir=str(out_dir), adapter=None, init_from=None, device="cpu", dtype="auto", quantize="auto")]
    results = out_dir / "e2e_test"
    scores = json.loads((results / "scores.json").read_text())
    assert scores["mrs"] == 2 and scores["beam_size"] == beam_size and 0 <= scores["bleu"] <= 100
    # what the decoding applied: greedy uses neither beam-search setting, so neither is recorded as used
    applied = (None, None) if beam_size == 1 else (0.9, 4)
    assert (scores["length_penalty"], scores["no_repeat_ngram_size"]) == applied
    assert len((results / "predictions.txt").read_text().splitlines()) == 2
    assert read_like_measure_scores(results / "references.txt", multi_ref=True) == REFS[:2]
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "NIST" in printed and "official scorer's layout" in printed


def test_cli_without_data_says_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate_e2e.py"), "--out_dir", str(tmp_path),
                        "--data_dir", str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "python data/e2e/prepare.py" in r.stderr
