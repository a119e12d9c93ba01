"""The byte-level BPE tokenizer.json of GPT-NeoX (Pythia), Llama 3, Qwen2 and SmolLM2, read with the
`tokenizers` package (an optional extra: pip install tokenizers). data.load_tokenizer comes here for any
tokenizer that is neither GPT-2's BPE (tiktoken) nor tgl's word vocabulary.

Why `tokenizers` and not a conversion to a tiktoken encoding (docs/figure2.md, "Tokenizers"): it is the
library that wrote these files and that transformers' fast tokenizers run, so every normalizer,
pre-tokenizer and added token is handled by construction. A tiktoken encoding is exact only where merge
order and ids agree and tiktoken's rule (any adjacent pair whose concatenation is a token merges) gives
the merges list's result: true for tiktoken-born vocabularies (Llama 3), not guaranteed for trainer-made
ones (GPT-NeoX). A silently different id is worse than a dependency.

BOS and EOS are read as transformers reads them: the EOS (between documents) is tokenizer_config.json's
eos_token (else special_tokens_map.json's, else config.json's eos_token_id); the BOS is what
tokenizer.json's post_processor puts before the text (Llama 3's template), checked against
tokenizer_config.json's add_bos_token where that is given.
"""
import hashlib
import json
import re
from pathlib import Path

from common import atomic_path, read_json, write_text

# hub names whose tokenizer is GPT-2's BPE (tiktoken, nothing downloaded), as before this module
GPT2_NAMES = re.compile(r"(openai-community/)?(distil)?gpt2(-medium|-large|-xl)?|EleutherAI/gpt-neo-[\w.]+")
SENTENCEPIECE = ("a SentencePiece tokenizer (Llama 2, Mistral v0.1, Gemma): unsupported; tgl reads byte-level "
                 "BPE tokenizer.json files (GPT-2, GPT-NeoX/Pythia, Llama 3, Qwen2, SmolLM2)")


def family_tokenizer(spec: str, folder: Path):
    """The tokenizer of --init / --tokenizer `spec` (its folder, or a hub name): an HFTokenizer, or None for
    GPT-2's BPE (GPT-2 and GPT-Neo models, whose tokenizer.json is GPT-2's, and runs that kept no file)."""
    if not folder.exists():
        if GPT2_NAMES.fullmatch(spec):
            return None
        from experiments.hf import is_hub_name
        if not is_hub_name(spec):
            raise ValueError(f"tokenizer {spec}: no such file or folder, nor a hub name (ORG/NAME, or gpt2)")
        from experiments.fetch import hub_folder  # downloaded once, with its tokenizer files
        folder = Path(hub_folder(spec))
    if (folder / "tokenizer.json").is_file():
        d = read_json(folder / "tokenizer.json")
        vocab = d["model"].get("vocab") if isinstance(d, dict) and isinstance(d.get("model"), dict) else None
        gpt2 = isinstance(vocab, dict) and len(vocab) == 50257 and vocab.get("\u0120the") == 262
        return None if gpt2 else HFTokenizer(folder)  # GPT-2's own vocabulary: tiktoken's, as before
    if (folder / "tokenizer.model").is_file():
        raise ValueError(f"{folder / 'tokenizer.model'}: {SENTENCEPIECE}")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in (None, "gpt2", "gpt_neo"):
        raise ValueError(f"{folder}: a {model_type} model without tokenizer.json; give --tokenizer")
    return None


def _token(value):
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _check_byte_level(path: Path, spec: dict):
    """Byte-level BPE only: a SentencePiece-style file (byte fallback, Metaspace) is refused, naming it."""
    model = spec["model"] if isinstance(spec.get("model"), dict) else {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("byte_fallback") or '"Metaspace"' in pre or model.get("type") == "Unigram":
        raise ValueError(f"{path}: {SENTENCEPIECE}")
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise ValueError(f"{path}: not a byte-level BPE tokenizer (model {model.get('type')!r}, no ByteLevel "
                         "pre-tokenizer); tgl reads GPT-2, GPT-NeoX, Llama 3, Qwen2 and SmolLM2 tokenizer.json")


class HFTokenizer:
    """data.GPT2Tokenizer's interface over a tokenizer.json: name, fingerprint, n_vocab, eot, bos, encode,
    decode, save."""
    name = "hf"

    def __init__(self, folder):
        self.folder, path = Path(folder), Path(folder) / "tokenizer.json"
        self.raw, spec = path.read_bytes(), read_json(path)
        _check_byte_level(path, spec if isinstance(spec, dict) else {})
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"{path}: reading it needs the tokenizers package: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_str(self.raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers package reads ({e})") from None
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in text is plain text, as tiktoken's encode_ordinary
        self.config = self._json("tokenizer_config.json")
        self.n_vocab = 1 + max(self.tok.get_vocab(with_added_tokens=True).values())
        self.eot, self.bos = self._eos(), self._bos(path)
        specials = f"|bos={self.bos}|eot={self.eot}".encode()
        self.fingerprint = hashlib.sha1(self.raw + specials).hexdigest()[:12]

    def _json(self, name) -> dict:
        d = read_json(self.folder / name) if (self.folder / name).is_file() else {}
        return d if isinstance(d, dict) else {}

    def _id(self, token, where):
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{where}: the token {token!r} is not in tokenizer.json")
        return i

    def _eos(self) -> int:
        """The EOS put between documents: tokenizer_config.json's, special_tokens_map.json's, config.json's."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            token = _token(self._json(name).get("eos_token"))
            if isinstance(token, str):
                return self._id(token, self.folder / name)
        eos = self._json("config.json").get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < self.n_vocab:
            return eos
        raise ValueError(f"{self.folder}: no EOS token (tokenizer_config.json's eos_token, or config.json's "
                         "eos_token_id): a causal LM needs one between documents")

    def _bos(self, path):
        """The token the post_processor puts before a text (None if none), as AutoTokenizer adds it."""
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        k = next((k for k in range(len(full) + 1) if full[k:k + len(plain)] == plain), None)
        if k is None or k > 1:
            raise ValueError(f"{path}: its post_processor puts {full} around the text {plain}: "
                             "one BOS at most is supported")
        bos = full[0] if k else None
        add = self.config.get("add_bos_token")
        if isinstance(add, bool) and add != (bos is not None):  # transformers 4 and 5 would disagree
            raise ValueError(f"{self.folder / 'tokenizer_config.json'}: add_bos_token is {add}, but "
                             f"tokenizer.json's post_processor {'adds' if bos is not None else 'adds no'} "
                             "BOS; make them agree")
        return bos

    def encode(self, text: str) -> list:  # no BOS/EOS: data.py places them
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path):
        """The tokenizer files into the folder of `path` (train.py's run folder, an export), so that
        data.load_tokenizer and AutoTokenizer read them there: tokenizer.json byte for byte, the others as
        given; tokenizer_config.json gains the class that runs tokenizer.json as written, and the EOS,
        where it lacked them."""
        folder, copy = Path(path).parent, ["tokenizer.json", "special_tokens_map.json"]
        config = dict({"tokenizer_class": "PreTrainedTokenizerFast"}, **self.config)
        config.setdefault("eos_token", self.tok.id_to_token(self.eot))
        if config == self.config:
            copy.append("tokenizer_config.json")
        else:
            write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        for name in copy:  # byte for byte
            if (self.folder / name).is_file():
                with atomic_path(folder / name) as tmp:
                    Path(tmp).write_bytes((self.folder / name).read_bytes())
