"""Tokenizers built with HF `tokenizers` from GGUF metadata or `tokenizer.json`, plus chat templates."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from hdjax.errors import HdjaxError

CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama-2": ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                "{% set messages = messages[1:] %}{% endif %}"
                "{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ bos_token + '[INST] ' }}{% if loop.first and system is defined %}"
                "{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
                "{{ message['content'].strip() + ' [/INST]' }}"
                "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "vicuna": ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
               "{% set messages = messages[1:] %}{% else %}{{ 'A chat between a curious user and an artificial "
               "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s "
               "questions. ' }}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token"
               " }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
}


class HdTokenizer:
  """Wraps a `tokenizers.Tokenizer` with the model's special ids and chat template."""

  def __init__(self, tok: Tokenizer, bos_id: int, eos_ids: Sequence[int], chat_template: str | None,
               add_bos: bool = False):
    self.tok = tok
    self.bos_id = bos_id
    self.eos_ids = tuple(eos_ids)
    self.add_bos = add_bos
    self.chat_template = chat_template or CHAT_TEMPLATES["chatml"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    try:
      self._template = env.from_string(self.chat_template)
    except jinja2.TemplateError as e:
      raise HdjaxError(f"the chat template does not compile ({type(e).__name__}: {e})") from None

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @functools.cached_property
  def identity(self) -> str:
    """A short hash of the vocabulary, stored in databases built with this tokenizer. Cached: hashing the
    vocabulary takes ~0.15 s, and every request of a database-backed method asks for it."""
    vocab = sorted(self.tok.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special-token strings map to their ids; no BOS is added."""
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    return self.tok.id_to_token(i)

  def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    bos = self.id_to_token(self.bos_id) or ""
    eos = self.id_to_token(self.eos_ids[0]) or ""
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                                 eos_token=eos)

  def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    ids = self.encode(self.render_chat(messages, add_generation_prompt))
    if self.add_bos and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    return ids


def _raise_template_error(message: str):
  raise HdjaxError(f"chat template error: {message}")


def _byte_level(tok: Tokenizer, pre: str) -> None:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama3", "llama-bpe"):
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """BPE merges recovered from a SentencePiece vocabulary: a pair merges when their concatenation is a token,
  ranked by that token's score (what HF's converter does for llama GGUF files)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for merged, idx in vocab.items():
    for cut in range(1, len(merged)):
      left, right = merged[:cut], merged[cut:]
      if left in vocab and right in vocab:
        merges.append((scores[idx], vocab[left], vocab[right], left, right))
  merges.sort(key=lambda m: (-m[0], m[1], m[2]))
  return [(m[3], m[4]) for m in merges]


def from_gguf_fields(fields: dict[str, Any]) -> HdTokenizer | None:
  """A tokenizer from `tokenizer.ggml.*` metadata, or None when the file has none; an `HdjaxError` for metadata
  that is missing, of the wrong type or that `tokenizers` rejects."""
  kind = fields.get("tokenizer.ggml.model")
  if kind is None:
    return None
  tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges", [])
  ids = [fields.get(f"tokenizer.ggml.{k}_token_id", 0) for k in ("bos", "eos", "padding")]
  if (not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens)
      or not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges)
      or not all(isinstance(i, int) and 0 <= i < len(tokens) for i in ids)
      or not isinstance(fields.get("tokenizer.chat_template", ""), str)):
    raise HdjaxError("GGUF tokenizer metadata is missing or malformed (tokens, merges, special token ids or chat "
                     "template)")
  try:
    return _gguf_tokenizer(fields, kind)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise HdjaxError(f"GGUF tokenizer metadata is malformed ({type(e).__name__}: {e})") from None
  except HdjaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises its own untyped Exception)
    raise HdjaxError(f"GGUF tokenizer metadata is rejected by tokenizers ({str(e).splitlines()[0] if str(e) else e!r})"
                     ) from None


def _gguf_tokenizer(fields: dict[str, Any], kind: str) -> HdTokenizer:
  tokens = list(fields["tokenizer.ggml.tokens"])
  types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {t: i for i, t in enumerate(tokens)}
  if kind == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
    _byte_level(tok, fields.get("tokenizer.ggml.pre", "default"))
  elif kind == "llama":
    scores = list(fields.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores), unk_token=tokens[0], fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
  else:
    raise HdjaxError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
  special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
  tok.add_special_tokens(special)
  eos = int(fields.get("tokenizer.ggml.eos_token_id", 2))
  eos_ids = [eos] + [vocab[t] for t in ("<|im_end|>", "<|eot_id|>") if t in vocab and vocab[t] != eos]
  return HdTokenizer(tok, int(fields.get("tokenizer.ggml.bos_token_id", 1)), eos_ids,
                     fields.get("tokenizer.chat_template"), bool(fields.get("tokenizer.ggml.add_bos_token", False)))


def from_hf_dir(path: str, bos_id: int, eos_ids: Sequence[int]) -> HdTokenizer:
  """A tokenizer from `tokenizer.json` (+ `tokenizer_config.json` for the chat template) in an HF directory."""
  tj = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tj):
    raise HdjaxError(f"no tokenizer.json in {path}")
  from hdjax.weights.safetensors_dir import read_json  # pylint: disable=import-outside-toplevel
  try:
    tok = Tokenizer.from_file(tj)
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises its own untyped Exception)
    raise HdjaxError(f"{tj} is not a valid tokenizer file ({str(e).splitlines()[0] if str(e) else e!r})") from None
  template, add_bos = None, False
  tc = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(tc):
    conf = read_json(tc)
    template = conf.get("chat_template")
    add_bos = bool(conf.get("add_bos_token", False))
    if isinstance(template, list):
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template in CHAT_TEMPLATES:
    template = CHAT_TEMPLATES[template]
  vocab = tok.get_vocab(with_added_tokens=True)
  extra_eos = [vocab[t] for t in ("<|im_end|>", "<|eot_id|>") if t in vocab and vocab[t] not in eos_ids]
  return HdTokenizer(tok, bos_id, list(eos_ids) + extra_eos, template, add_bos)
