"""Conversation templates: a LLaVA-format conversation -> token ids + labels where only the answers are learned.

A conversation is a list of turns ``{"from": "human" | "gpt", "value": str}`` (LLaVA's instruction JSON). Media
tags in a turn (``<image>``, ``<audio>``, ``<video>``) become ONE placeholder id each, where the tag is
(:data:`IMAGE_TOKEN_ID` -200 and :data:`AUDIO_TOKEN_ID` -300 as MoE-LLaVA / Uni-MoE, :data:`VIDEO_TOKEN_ID` -400 as
Uni-MoE's 8-expert code); the model splices the media tokens in there. Labels are :data:`IGNORE_INDEX` (-100) for
the system prompt, the human turns, the role names and every placeholder; the assistant's answers and their end
token are the only supervised positions.

Templates (:data:`TEMPLATES`, :func:`get_template`), after the official MoE-LLaVA code (``moellava/conversation.py``
and the ``--version`` of its training scripts ``scripts/v1/{stablelm,phi2,qwen}``):

- ``"plain"``: stage I (``pretrain.sh --version plain``): the human turn is replaced by its media tags alone, then
  the answer, then ``"\\n"``; only the tags are ignored (the caption and the newline are learned). Exactly one
  human and one gpt turn, with a media tag.
- ``"stablelm"``, ``"phi"``, ``"qwen"``: stages II and III (``finetune.sh`` / ``finetune_moe.sh --version
  stablelm|phi|qwen``; ``qwen`` is the same object as ``phi`` in the official table): the system sentence, then
  per round ``"USER: {human} ASSISTANT: {answer}<|endoftext|>"`` (rounds joined with no space), where
  ``<|endoftext|>`` is the tokenizer's eos token (so it is ``tokenizer.eos_token_id`` here). Learned: the answer
  (from the token after ``"ASSISTANT:"``) and its eos.
- ``"tiny"``: the same chat layout without a system sentence, with a bos token in front; for tiny LMs trained from
  scratch on :class:`CompactTokenizer` (a system sentence costs context and teaches nothing there).
- ``"tiny_plain"``: ``"plain"`` ending with eos instead of ``"\\n"`` (the compact tokenizer drops whitespace, so a
  newline would leave the model no way to stop).

How the answer boundary is found, and where this differs from the official code on purpose: the official
``preprocess_phi`` tokenizes each round (``rou``) and its instruction part (``"... ASSISTANT: "``, trailing space
included) and ignores ``len(instruction) - 1`` tokens: the ``- 1`` takes back the lone trailing-space token that
byte-level BPE tokenizers (Phi-2, Qwen, StableLM-2) give the instruction alone, because in the whole round that
space belongs to the first answer word. Here the instruction is tokenized WITHOUT the trailing space and its
tokens must be a prefix of the round's tokens (else a ValueError says the tokenizer merges across the boundary),
which gives the same labels for those tokenizers and stays right for tokenizers that do not split a trailing space
off. Rounds are tokenized one at a time and concatenated; the official code tokenizes the whole prompt at once,
which is the same ids whenever the round separator is a special token (it is: the eos). A conversation that starts
with a gpt turn has that turn dropped, as the official code does; everything else it would accept silently (a
trailing human turn, which it masks whole with a warning) is an error here.

Tokenizers are anything with ``encode(text) -> list[int]`` (no special tokens added) and ``eos_token_id`` (and
``bos_token_id`` for templates with ``add_bos``); :class:`CompactTokenizer` is the zoo's; :class:`HFTokenizer`
wraps a Hugging Face tokenizer object (the zoo does not import transformers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200
AUDIO_TOKEN_ID = -300
VIDEO_TOKEN_ID = -400
MEDIA_TAGS: dict[str, int] = {"<image>": IMAGE_TOKEN_ID, "<audio>": AUDIO_TOKEN_ID, "<video>": VIDEO_TOKEN_ID}
MEDIA_KINDS: dict[str, int] = {"image": IMAGE_TOKEN_ID, "audio": AUDIO_TOKEN_ID, "video": VIDEO_TOKEN_ID}
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in MEDIA_TAGS) + ")")

HUMAN, GPT = "human", "gpt"

# The official system sentence of the vicuna-v1-style templates (conv_phi / conv_stablelm in moellava/conversation.py).
CHAT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class TextTokenizer(Protocol):
    """What a template needs of a tokenizer."""

    eos_token_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...


class ConversationError(ValueError):
    """A conversation that cannot be turned into training tokens (the message names the sample and the fix)."""


def check_conversation(conversation: Any, sample: str = "conversation") -> list[dict[str, str]]:
    """Validate LLaVA turns and return them (a leading gpt turn dropped, as the official code does).

    Errors (ConversationError): not a list of ``{"from", "value"}`` dicts, a role other than human / gpt, turns not
    alternating human, gpt, human, ..., no gpt turn, a trailing human turn with no answer.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)) or not conversation:
        raise ConversationError(f"{sample}: 'conversations' must be a non-empty list of "
                                f"{{'from': 'human'|'gpt', 'value': str}} turns, got {conversation!r:.200}")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{sample}: turn {i} must be a dict with keys 'from' and 'value', got {turn!r:.200}")
        if turn["from"] not in (HUMAN, GPT):
            raise ConversationError(f"{sample}: turn {i} is from {turn['from']!r}; LLaVA turns are from 'human' or "
                                    "'gpt'")
        if not isinstance(turn["value"], str):
            raise ConversationError(f"{sample}: turn {i} value must be a string, got {type(turn['value']).__name__}")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if turns[0]["from"] == GPT:  # the official preprocess skips a first turn that is not from the human
        turns = turns[1:]
    if not any(t["from"] == GPT for t in turns):
        raise ConversationError(f"{sample}: the conversation has no 'gpt' turn, so nothing would be learned from it; "
                                "add the assistant's answer or drop the sample")
    for i, turn in enumerate(turns):
        if turn["from"] != (HUMAN, GPT)[i % 2]:
            raise ConversationError(f"{sample}: turns must alternate human, gpt, human, ...; turn {i} (after dropping "
                                    f"a leading gpt turn, if any) is from {turn['from']!r}")
    if turns[-1]["from"] == HUMAN:
        raise ConversationError(f"{sample}: the last turn is a human turn with no answer; end with a 'gpt' turn")
    return turns


def count_media(turns: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """``{"image": n, "audio": n, "video": n}``: media tags in all turns."""
    text = "".join(t["value"] for t in turns)
    return {kind: text.count(tag) for kind, tag in zip(MEDIA_KINDS, MEDIA_TAGS)}


def tokenize_with_media(text: str, tokenizer: TextTokenizer) -> list[int]:
    """``tokenizer.encode`` of ``text`` with each media tag replaced by its placeholder id (the pieces between tags
    are tokenized separately, as the official ``tokenizer_image_token`` does)."""
    ids: list[int] = []
    for piece in _TAG_SPLIT.split(text):
        if piece in MEDIA_TAGS:
            ids.append(MEDIA_TAGS[piece])
        elif piece:
            ids.extend(int(i) for i in tokenizer.encode(piece))
    return ids


@dataclass
class EncodedConversation:
    """``input_ids`` and ``labels`` (same length; labels are IGNORE_INDEX where nothing is learned)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns become text and which tokens are learned (see the module docstring).

    Attributes:
        name: registry key.
        style: ``"chat"`` (system sentence, ``role: text`` turns, answer + eos per round) or ``"plain"`` (media
            tags + answer + ``sep``; one round).
        system: chat only: text before the first round, followed by ``sep``; ``""`` = no system segment at all.
        roles: chat only: the human's and the assistant's names.
        sep: chat: between the system sentence and round 1 and between a human turn and the assistant's role;
            plain: text appended to the answer (learned).
        end_with_eos: append the tokenizer's eos after each answer (learned).
        add_bos: put the tokenizer's ``bos_token_id`` first (ignored in the labels).
    """

    name: str
    style: str = "chat"
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    end_with_eos: bool = True
    add_bos: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.style not in ("chat", "plain"):
            raise ValueError(f"template style must be 'chat' or 'plain', got {self.style!r}")

    # ------------------------------------------------------------------------------------------- text
    def _round_texts(self, turns: list[dict[str, str]]) -> list[tuple[str, str]]:
        """``[(instruction, answer)]`` per round: ``instruction`` ends with the assistant role's colon, ``answer``
        starts with the space after it (chat) / is the answer + sep (plain)."""
        if self.style == "plain":
            if len(turns) != 2:
                raise ConversationError(f"template {self.name!r} takes exactly one human and one gpt turn "
                                        f"(a caption pair), got {len(turns)} turns")
            tags = "".join(_TAG_SPLIT.findall(turns[0]["value"]))
            if not tags:
                raise ConversationError(f"template {self.name!r} needs a media tag (<image>, <audio>, <video>) in "
                                        "the human turn: its text is replaced by the tags alone")
            return [(tags, turns[1]["value"] + self.sep)]
        user, assistant = self.roles
        rounds = []
        for r in range(0, len(turns), 2):
            head = (self.system + self.sep) if (r == 0 and self.system) else ""
            instruction = f"{head}{user}: {turns[r]['value']}{self.sep}{assistant}:"
            rounds.append((instruction, " " + turns[r + 1]["value"]))
        return rounds

    def render(self, conversation: Sequence[Mapping[str, str]], eos_text: str = "<|endoftext|>") -> str:
        """The whole conversation as one string, eos written as ``eos_text`` (for reading and for comparison with
        the official ``Conversation.get_prompt()``)."""
        turns = check_conversation(conversation)
        end = eos_text if self.end_with_eos else ""
        return "".join(i + a + end for i, a in self._round_texts(turns))

    # ------------------------------------------------------------------------------------------ tokens
    def _bos(self, tokenizer: TextTokenizer) -> list[int]:
        if not self.add_bos:
            return []
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(f"template {self.name!r} puts a bos token first but the tokenizer has no bos_token_id")
        return [int(bos)]

    def encode(self, conversation: Sequence[Mapping[str, str]], tokenizer: TextTokenizer,
               sample: str = "conversation") -> EncodedConversation:
        """Token ids with placeholders and labels (IGNORE_INDEX except on answers and their end token)."""
        turns = check_conversation(conversation, sample)
        ids = self._bos(tokenizer)
        labels = [IGNORE_INDEX] * len(ids)
        for instruction, answer in self._round_texts(turns):
            prompt = tokenize_with_media(instruction, tokenizer)
            whole = tokenize_with_media(instruction + answer, tokenizer)
            if whole[:len(prompt)] != prompt:
                raise ValueError(f"{sample}: the tokenizer merges the end of the prompt {instruction[-20:]!r} with the "
                                 f"answer {answer[:20]!r}, so the answer's first token cannot be told apart; "
                                 "use a tokenizer that splits at whitespace before words (byte-level BPE does)")
            if len(whole) == len(prompt) and not self.end_with_eos:
                raise ConversationError(f"{sample}: the answer {answer!r} gives no tokens, nothing would be learned")
            if any(i < 0 for i in whole[len(prompt):]):
                raise ConversationError(f"{sample}: a media tag in an assistant answer; tags belong in human turns")
            end = [int(tokenizer.eos_token_id)] if self.end_with_eos else []
            ids += whole + end
            labels += [IGNORE_INDEX] * len(prompt) + whole[len(prompt):] + end
        return EncodedConversation(ids, labels)

    def encode_prompt(self, conversation: Sequence[Mapping[str, str]], tokenizer: TextTokenizer,
                      sample: str = "conversation") -> tuple[list[int], str]:
        """For generation: ``(ids of everything before the LAST answer, ending with "ASSISTANT:" (chat) / the
        media tags (plain), the last answer's text)``; the model continues from there."""
        turns = check_conversation(conversation, sample)
        rounds = self._round_texts(turns)
        ids = self._bos(tokenizer)
        end = [int(tokenizer.eos_token_id)] if self.end_with_eos else []
        for instruction, answer in rounds[:-1]:
            ids += tokenize_with_media(instruction + answer, tokenizer) + end
        ids += tokenize_with_media(rounds[-1][0], tokenizer)
        return ids, turns[-1]["value"]

    def texts(self, conversation: Sequence[Mapping[str, str]], sample: str = "conversation") -> list[str]:
        """Every text piece this template tokenizes for ``conversation`` (media tags removed): what a vocabulary
        built from training data must cover."""
        turns = check_conversation(conversation, sample)
        out = []
        for instruction, answer in self._round_texts(turns):
            out += [p for p in _TAG_SPLIT.split(instruction + answer) if p and p not in MEDIA_TAGS]
        return out


TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": ConversationTemplate("plain", style="plain", sep="\n", end_with_eos=False,
                                  notes="MoE-LLaVA stage I (conv_llava_plain)"),
    "stablelm": ConversationTemplate("stablelm", system=CHAT_SYSTEM, notes="MoE-LLaVA StableLM-2 (conv_stablelm)"),
    "phi": ConversationTemplate("phi", system=CHAT_SYSTEM, notes="MoE-LLaVA Phi-2 (conv_phi)"),
    "qwen": ConversationTemplate("qwen", system=CHAT_SYSTEM, notes="MoE-LLaVA Qwen (conv_phi, as the official table)"),
    "tiny": ConversationTemplate("tiny", add_bos=True, notes="tiny LMs from scratch: no system sentence, bos first"),
    "tiny_plain": ConversationTemplate("tiny_plain", style="plain", sep="", end_with_eos=True, add_bos=True,
                                       notes="stage I for tiny LMs: media tags, answer, eos"),
}


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """A template by name (or the template itself)."""
    if isinstance(name, ConversationTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------------------ tokenizers
@lru_cache(maxsize=1)
def _open_clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer  # its BPE vocabulary ships inside the package

    return SimpleTokenizer()


class CompactTokenizer:
    """open_clip's BPE renumbered to a compact vocabulary of the tokens the TRAINING texts use (as
    :class:`zoo.data.text.CompactVocab` does for captions): 0 = pad, 1 = unk (a BPE token no training text has),
    2 = bos, 3 = eos, then the training tokens in BPE-id order. open_clip lower-cases, cleans whitespace and splits
    punctuation, so ``decode`` gives ``"a dog runs ."``-style text; media tags never reach it (the templates cut
    them out first).

    Build with :meth:`build` from training text only; save with :meth:`state_dict` and restore with
    :meth:`from_state_dict` (the datamodule puts it in its state, so a checkpoint decodes as it was trained).
    """

    PAD, UNK, BOS, EOS = 0, 1, 2, 3
    SPECIAL = 4
    KIND = "open_clip_bpe_compact"
    pad_token_id, unk_token_id, bos_token_id, eos_token_id = PAD, UNK, BOS, EOS

    def __init__(self, bpe_ids: Sequence[int]) -> None:
        ids = sorted({int(i) for i in bpe_ids})
        self.bpe_ids = ids  # compact id SPECIAL + i <-> open_clip BPE id ids[i]
        self._to_compact = {b: self.SPECIAL + i for i, b in enumerate(ids)}
        self._encode_cached = lru_cache(maxsize=1 << 16)(self._encode_uncached)

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CompactTokenizer":
        bpe = _open_clip_bpe()
        used: set[int] = set()
        for text in set(texts):
            used.update(bpe.encode(text))
        return cls(sorted(used))

    @property
    def vocab_size(self) -> int:
        return self.SPECIAL + len(self.bpe_ids)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self._to_compact.get(b, self.UNK) for b in _open_clip_bpe().encode(text))

    def encode(self, text: str) -> list[int]:
        return list(self._encode_cached(text))

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Text of compact ids: special and placeholder ids are dropped, unk shows as ``<unk>``, stops at eos."""
        bpe, words = _open_clip_bpe(), []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i == self.EOS and stop_at_eos:
                break
            if i >= self.SPECIAL:
                run.append(self.bpe_ids[i - self.SPECIAL])
                continue
            if i == self.UNK:
                if run:
                    words.append(bpe.decode(run).strip())
                run = []
                words.append("<unk>")
        if run:
            words.append(bpe.decode(run).strip())
        return " ".join(w for w in words if w)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "bpe_ids": list(self.bpe_ids)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "CompactTokenizer":
        if state.get("kind") != cls.KIND:
            raise ValueError(f"not a CompactTokenizer state (kind {state.get('kind')!r}, expected {cls.KIND!r})")
        return cls(state["bpe_ids"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompactTokenizer) and other.bpe_ids == self.bpe_ids

    def __repr__(self) -> str:
        return f"CompactTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer object (built by the caller) behind the :class:`TextTokenizer` interface:
    ``encode`` adds no special tokens; pad falls back to unk, then eos (the official MoE-LLaVA pads with unk)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the chat templates end every answer with it")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.bos_token_id = tokenizer.bos_token_id
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id) if t is not None), self.eos_token_id)
        self.pad_token_id = int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True)


def labels_tensor(encoded: EncodedConversation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids int64 [L], labels int64 [L])``."""
    return torch.tensor(encoded.input_ids, dtype=torch.long), torch.tensor(encoded.labels, dtype=torch.long)
