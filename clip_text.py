"""The text side of Stable Diffusion: CLIP's BPE tokenizer and CLIP's text transformer.

A prompt becomes 77 token ids, and the ids become the context [B, 77, 768] (SD v1) or
[B, 77, 1024] (SD 2.x) that every cross-attention layer of the UNet reads.

SD 2.x swaps OpenAI's ViT-L/14 text tower for OpenCLIP's ViT-H/14 (width 1024, 24 layers, 16 heads)
with three differences, all settings here: exact GELU instead of quick_gelu (TextConfig.hidden_act);
the context is the penultimate layer's output, after the final LayerNorm, so our module simply has
layers=23 and a converter drops the unused 24th resblock (as diffusers' CLIPTextModel for SD 2.x does);
and the tokenizer pads with id 0 ('!') instead of <|endoftext|> (Tokenizer(pad="!")).

Sources (read for understanding, written here from scratch):
- Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
  (CLIP), section 2.4: a 12-layer, width-512 masked transformer over lower-cased byte-level BPE
  with a 49,152 vocabulary; SD v1 uses the ViT-L/14 text tower (width 768, 12 heads).
- Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units" (BPE).
- openai/CLIP clip/simple_tokenizer.py and clip/model.py: the vocabulary, the byte table,
  the pre-split pattern, quick_gelu.
- huggingface/transformers models/clip/{tokenization,modeling}_clip.py: the parameter names
  stored in SD v1 checkpoints (cond_stage_model.transformer.text_model.*) and the text cleaning.
- CompVis/stable-diffusion ldm/modules/encoders/modules.py (FrozenCLIPEmbedder): padding to 77
  with <|endoftext|>, no attention mask, last_hidden_state after the final LayerNorm as context.
- Stability-AI/stablediffusion ldm/modules/encoders/modules.py (FrozenOpenCLIPEmbedder, layer
  "penultimate") and mlfoundations/open_clip (tokenizer.py: zero padding; model configs: ViT-H-14
  uses GELU): the SD 2.x text side.
"""

import gzip
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_BPE = Path(__file__).resolve().parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
OPENAI_MERGES = 49152 - 256 - 2  # 48,894: the gz file holds many more, CLIP used only these
MERGES_HEADER = "#version: 0.2"

# Pre-split a cleaned prompt into words before BPE; whitespace is dropped here. Merges never cross
# these boundaries, and a digit is always its own chunk. IGNORECASE is OpenAI's (and transformers
# 4.x's); on lower-cased text it changes one code point: U+0345 (a Greek combining mark that folds
# to a letter) matches no branch and is dropped, where transformers 5.x keeps it as a symbol.
SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")


# ----------------------------------------------------------------------------------------------
# Tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """Give each of the 256 byte values a printable character, so BPE can work on strings.

    The 188 bytes that already print (ASCII '!'..'~', Latin-1 '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (space, control bytes, ...) get chr(256), chr(257), ... in byte order.
    Insertion order matters: it is the order of the first 256 vocabulary entries ('!' = 0).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """Normalise a prompt as transformers 5.x's CLIPTokenizer does (the reference in our tests).

    transformers 5.x only has the `tokenizers`-backed CLIPTokenizer, and it never uses ftfy: NFC,
    any run of whitespace -> one space, lower-case one character at a time. How the other implementations differ:
    - OpenAI CLIP / open_clip: ftfy.fix_text (repairs mojibake), html.unescape twice ("&amp;" ->
      "&"), then str.lower() on the whole string, which turns a word-final 'Σ' into 'ς' (per
      character it becomes 'σ', as here).
    - the old Python CLIPTokenizer of transformers 4.x without ftfy: BERT's BasicTokenizer, which
      also deletes control characters and puts spaces around CJK ideographs (so '猫の' is two words
      there, one word here).
    They only disagree on such rare prompts; plain English prompts get identical ids. One more
    difference with transformers 5.x: Python's NFC tables are of a newer Unicode version than the
    Rust ones behind `tokenizers`, so two adjacent combining marks added recently to Unicode (such
    as U+0898 U+0899) may be put in a different order.
    """
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE.sub(" ", text)  # no strip(): it would also eat \x1c-\x1f, which \s does not
    return "".join(ch.lower() for ch in text)


def parse_merges(text: str) -> list[tuple[str, str]]:
    """'#version: 0.2' header, then one merge per line: two symbols separated by a space (a real
    space byte is the symbol 'Ġ', so the separator is unambiguous)."""
    lines = [ln for ln in text.split("\n") if ln.strip() and not ln.startswith("#version")]
    return [tuple(ln.split()) for ln in lines]


def merge_pair(symbols, pair):
    """Merge every occurrence of `pair` in a list of symbols, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def read_pad_token(folder) -> str:
    """The pad token a tokenizer folder names (tokenizer_config.json or special_tokens_map.json, as a
    string or as {"content": ...}); <|endoftext|> when neither says."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = Path(folder) / name
        pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token") if f.is_file() else None
        if pad is not None:
            return pad["content"] if isinstance(pad, dict) else pad
    return EOT


class Tokenizer:
    """CLIP byte-level BPE with SD framing: [sot] + ids[:75] + [eot], padded to 77 with `pad`:
    eot in SD v1 (transformers' CLIPTokenizer, pad_token <|endoftext|>), '!' = id 0 in SD 2.x
    (open_clip's tokenize pads with zeros; SD 2.x's tokenizer folder says pad_token '!').

    The vocabulary is not stored: it is built from the ordered merges list as
    256 byte symbols, the same 256 with '</w>' (end of word), one token per merge, sot, eot.
    With OpenAI's 48,894 merges that is 49,408 ids; a toy model may use far fewer merges.
    """

    def __init__(self, merges: list[tuple[str, str]], max_length: int = 77, pad: str = EOT):
        self.merges = [tuple(m) for m in merges]
        self.max_length = max_length
        self.pad = pad
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in self.merges] + [SOT, EOT]
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(self.vocab) != len(tokens):
            raise ValueError("merges list produces the same token twice; ids would be ambiguous")
        self.ranks = {m: i for i, m in enumerate(self.merges)}  # lower rank = learned earlier = merged first
        self.vocab_size = len(tokens)
        self.sot_id, self.eot_id = self.vocab_size - 2, self.vocab_size - 1
        self.pad_id = self.vocab[pad]
        # BPE of a word never changes, and prompts repeat words: remember each word's ids.
        # Seeded with the special tokens, so a prompt that spells out '<|endoftext|>' gets its id
        # (as in OpenAI's code; transformers only for the lower-case spelling, matched before
        # lower-casing).
        self.cache = {SOT: [self.sot_id], EOT: [self.eot_id]}

    @classmethod
    def from_openai_gz(cls, path=DEFAULT_BPE, pad: str = EOT):
        """OpenAI's bpe_simple_vocab_16e6.txt.gz: a header line, then one 'a b' merge per line."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:OPENAI_MERGES + 1]
        return cls([tuple(line.split()) for line in lines], pad=pad)

    @classmethod
    def from_merges_text(cls, text: str, pad: str = EOT):
        """Inverse of merges_text(): the merges.txt format of HF tokenizer folders."""
        return cls(parse_merges(text), pad=pad)

    def merges_text(self) -> str:
        return MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in self.merges)

    @classmethod
    def from_folder(cls, path):
        """A diffusers/HF tokenizer/ folder: vocab.json + merges.txt (as SD v1.5 ships it), or only
        the tokenizer.json that transformers >= 5 writes (the same vocab and merges in one file).

        We build the vocabulary from the merges as everywhere else, and use the stored vocab only
        as a check: it must be exactly the vocabulary we build, or loading fails. Like HF, merges
        beyond what the vocab can hold are ignored.
        """
        path = Path(path)
        if (path / "vocab.json").is_file() or not (path / "tokenizer.json").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = parse_merges((path / "merges.txt").read_text(encoding="utf-8"))
        else:
            bpe = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = bpe["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]  # "a b" or [a, b]
        tok = cls(merges[: len(vocab) - 2 * 256 - 2], pad=read_pad_token(path))
        if vocab != tok.vocab:
            diff = [t for t in vocab if tok.vocab.get(t) != vocab[t]][:5]
            raise ValueError(f"{path}: the stored vocabulary disagrees with the one built from the merges "
                             f"({len(vocab)} vs {tok.vocab_size} tokens; e.g. {diff})")
        return tok

    def save_folder(self, path):
        """Write a diffusers/HF tokenizer/ folder that from_folder and transformers' CLIPTokenizer read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (path / "merges.txt").write_text(self.merges_text(), encoding="utf-8")
        special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": self.pad}
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
             **special}, indent=2))

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-split word, already mapped to byte symbols."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]  # mark the end of the word
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break  # no learned merge applies any more
            symbols = merge_pair(symbols, best)
        ids = [self.vocab[s] for s in symbols]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without sot/eot and without truncation."""
        ids = []
        for chunk in SPLIT.findall(clean_text(text)):
            ids += self.bpe("".join(self.byte_encoder[b] for b in chunk.encode("utf-8")))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """Framed ids (B, max_length). Long prompts are cut to 75 tokens; eot is always kept."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.sot_id] + self.encode(text)[: self.max_length - 2] + [self.eot_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))  # eot (v1) or 0 (2.x)
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)


# ----------------------------------------------------------------------------------------------
# Text transformer. Attribute names follow HF CLIPTextModel, i.e. the keys stored in SD v1 files
# under cond_stage_model.transformer.text_model.*

@dataclass
class TextConfig:
    """Defaults: SD v1's OpenAI ViT-L/14 text tower. SD 2.x: SD_V2_TEXT below."""
    vocab_size: int = 49408
    max_length: int = 77  # number of learned positions
    width: int = 768
    layers: int = 12      # the layers run: SD 2.x has 23 (the 24th of ViT-H/14 is skipped, "penultimate")
    heads: int = 12       # head size 64
    hidden_act: str = "quick_gelu"  # the MLP's activation: "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)


# SD 2.x: OpenCLIP ViT-H/14 (laion2b_s32b_b79k) up to its penultimate layer
SD_V2_TEXT = TextConfig(width=1024, layers=23, heads=16, hidden_act="gelu")


def quick_gelu(x):
    # OpenAI's CLIP was trained with this sigmoid approximation of GELU; exact GELU shifts the outputs.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu: exact (erf), as OpenCLIP's nn.GELU


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Causal: token t sees tokens <= t only, as in CLIP's training (a GPT-style text tower).
        # So the eot padding after a prompt cannot change the prompt's own positions.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):  # (B, T, C)
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):  # (B, T, C)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        # No position_ids buffer (HF has one): positions are simply 0..T-1.

    def forward(self, tokens):  # (B, T)
        T = tokens.shape[1]
        return self.token_embedding(tokens) + self.position_embedding.weight[:T]  # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])

    def forward(self, x):  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return x


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, tokens):  # (B, T)
        return self.final_layer_norm(self.encoder(self.embeddings(tokens)))  # (B, T, C)


class TextEncoder(nn.Module):
    """Token ids (B, 77) -> SD context (B, 77, width): the last hidden state after the final
    LayerNorm, at every position (CompVis uses all 77, padding included, with no mask). For SD 2.x
    the last layer here is OpenCLIP's 23rd of 24: SD 2.x's "penultimate" context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)  # the extra level reproduces the 'text_model.' key prefix

    def forward(self, tokens):  # (B, T)
        return self.text_model(tokens)  # (B, T, width)


# ----------------------------------------------------------------------------------------------
# OpenCLIP's names for the same tensors: SD 2.x single files store its text tower under
# cond_stage_model.model.* (open_clip/transformer.py: nn.MultiheadAttention's fused in_proj, ln_1, ...)

OPEN_CLIP_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                   "positional_embedding": "embeddings.position_embedding.weight",
                   "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Not part of SD 2.x's context: the pooled output's projection, CLIP's logit temperature, and the last
# resblock (SD 2.x stops at the penultimate one)
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")


def open_clip_unused(sd: dict, layers: int | None = None) -> list:
    """The keys of an OpenCLIP text tower that SD's context does not use: text_projection, logit_scale and
    the resblocks from `layers` on (None: the last one, SD 2.x's penultimate cut of an official file)."""
    if layers is None:
        layers = max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")), default=0)
    return [k for k in sd if k in OPEN_CLIP_UNUSED or k.startswith("transformer.resblocks.")
            and int(k.split(".")[2]) >= layers]


def from_open_clip(sd: dict, layers: int | None = None) -> dict:
    """OpenCLIP text-tower state dict -> ours, with its first `layers` resblocks (None: all but the last,
    SD 2.x's penultimate cut of an official file). in_proj_weight [3C, C] is q, k and v stacked, in that
    order. Unknown keys pass through unrenamed, for the strict loader to name."""
    unused = set(open_clip_unused(sd, layers))
    out = {}
    for k, v in sd.items():
        if k in unused:
            continue
        if k in OPEN_CLIP_NAMES:
            out["text_model." + OPEN_CLIP_NAMES[k]] = v
        elif k.startswith("transformer.resblocks."):
            _, _, i, rest = k.split(".", 3)                     # rest: "ln_1.weight", "attn.in_proj_bias", ...
            module, leaf = rest.rsplit(".", 1)
            layer = f"text_model.encoder.layers.{i}."
            if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):  # (C, C) or (C,) each
                    out[f"{layer}self_attn.{name}.{leaf.removeprefix('in_proj_')}"] = part
            else:
                out[layer + OPEN_CLIP_LAYER.get(module, module) + "." + leaf] = v
        else:
            out[k] = v
    return out


def to_open_clip(sd: dict) -> dict:
    """Inverse of from_open_clip, for the layers we have: no 24th resblock, text_projection or logit_scale
    (checkpoint.py writes back those of the file it read, and stores the number of layers)."""
    names = {v: k for k, v in OPEN_CLIP_NAMES.items()}
    layer_names = {v: k for k, v in OPEN_CLIP_LAYER.items()}
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k in names:
            out[names[k]] = v
            continue
        _, _, i, rest = k.split(".", 3)                         # encoder.layers.i.rest
        module, leaf = rest.rsplit(".", 1)
        block = f"transformer.resblocks.{i}."
        if module.startswith("self_attn.") and module != "self_attn.out_proj":
            if module == "self_attn.q_proj":                    # q, k, v -> one fused in_proj
                out[f"{block}attn.in_proj_{leaf}"] = torch.cat(
                    [sd[f"text_model.encoder.layers.{i}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
        else:
            out[block + layer_names[module] + "." + leaf] = v
    return out
