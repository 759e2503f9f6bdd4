"""Conversation templates (label masking token by token), the official MoE-LLaVA masking rule on a byte-level BPE
tokenizer, the compact tokenizer, and bad conversations."""

from __future__ import annotations

import pytest

from zoo.data.templates import (
    AUDIO_TOKEN_ID,
    CHAT_SYSTEM,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    TEMPLATES,
    VIDEO_TOKEN_ID,
    CompactTokenizer,
    ConversationError,
    HFTokenizer,
    get_template,
)

X = IGNORE_INDEX


class WordTokenizer:
    """Toy tokenizer: one id per whitespace-separated word (':' split off), fixed table, eos 1, bos 2, pad 0."""

    eos_token_id, bos_token_id, pad_token_id = 1, 2, 0

    def __init__(self) -> None:
        self.table: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        words = text.replace(":", " : ").split()
        return [self.table.setdefault(w, 10 + len(self.table)) for w in words]

    def ids(self, text: str) -> list[int]:
        return self.encode(text)


def conv(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def test_tiny_template_masks_all_but_answers_token_by_token():
    tok = WordTokenizer()
    enc = get_template("tiny").encode(conv("<image>\nwhat is it", "a cat", "sure", "yes"), tok)
    w = tok.ids
    expected_ids = ([2] + w("USER:") + [IMAGE_TOKEN_ID] + w("what is it ASSISTANT:") + w("a cat") + [1]
                    + w("USER: sure ASSISTANT:") + w("yes") + [1])
    expected_labels = ([X] * (1 + 2 + 1 + 5) + w("a cat") + [1] + [X] * 5 + w("yes") + [1])
    assert enc.input_ids == expected_ids
    assert enc.labels == expected_labels


@pytest.mark.parametrize("name", ["stablelm", "phi", "qwen"])
def test_released_chat_templates_token_by_token(name):
    tok = WordTokenizer()
    enc = get_template(name).encode(conv("<image>\nQ1 here", "A1", "Q2", "A2 more"), tok)
    w = tok.ids
    round1 = w(CHAT_SYSTEM + " USER:") + [IMAGE_TOKEN_ID] + w("Q1 here ASSISTANT:")
    round2 = w("USER: Q2 ASSISTANT:")
    assert enc.input_ids == round1 + w("A1") + [1] + round2 + w("A2 more") + [1]
    assert enc.labels == [X] * len(round1) + w("A1") + [1] + [X] * len(round2) + w("A2 more") + [1]
    assert IMAGE_TOKEN_ID not in enc.labels and enc.input_ids[0] != 2  # no bos: none of the three tokenizers adds one


def test_chat_render_is_the_official_prompt_string():
    # conv_stablelm / conv_phi get_prompt(): system + " " + "USER: q ASSISTANT: a<|endoftext|>" per round
    text = get_template("stablelm").render(conv("<image>\nWhat?", "A dog.", "Sure?", "Yes"))
    assert text == (CHAT_SYSTEM + " USER: <image>\nWhat? ASSISTANT: A dog.<|endoftext|>"
                    "USER: Sure? ASSISTANT: Yes<|endoftext|>")
    assert get_template("qwen").render(conv("<image>x", "y")) == get_template("phi").render(conv("<image>x", "y"))


def test_plain_template_keeps_only_the_media_tags_and_learns_caption_and_newline():
    tok = WordTokenizer()
    enc = get_template("plain").encode(conv("Describe <image> please", "a dog runs"), tok)
    assert enc.input_ids == [IMAGE_TOKEN_ID] + tok.ids("a dog runs")  # "\n" has no word in the toy tokenizer
    assert enc.labels == [X] + tok.ids("a dog runs")
    tiny = get_template("tiny_plain").encode(conv("<audio> say", "seven"), tok)
    assert tiny.input_ids == [2, AUDIO_TOKEN_ID] + tok.ids("seven") + [1]
    assert tiny.labels == [X, X] + tok.ids("seven") + [1]
    with pytest.raises(ConversationError, match="exactly one human and one gpt"):
        get_template("plain").encode(conv("<image>", "a", "b", "c"), tok)
    with pytest.raises(ConversationError, match="needs a media tag"):
        get_template("plain").encode(conv("no tag", "a"), tok)


def test_media_tags_become_placeholders_where_they_are():
    tok = WordTokenizer()
    enc = get_template("tiny").encode(conv("hear <audio> and see <image> then <video> end", "ok"), tok)
    ids = enc.input_ids
    assert ids.count(AUDIO_TOKEN_ID) == ids.count(IMAGE_TOKEN_ID) == ids.count(VIDEO_TOKEN_ID) == 1
    assert ids.index(AUDIO_TOKEN_ID) < ids.index(IMAGE_TOKEN_ID) < ids.index(VIDEO_TOKEN_ID)
    assert all(lab == X for i, lab in zip(ids, enc.labels) if i < 0)


def test_generation_prompt_ends_at_the_assistant_role():
    tok = WordTokenizer()
    c = conv("<image> q1", "a1", "q2", "a2")
    t = get_template("tiny")
    ids, answer = t.encode_prompt(c, tok)
    full = t.encode(c, tok)
    assert answer == "a2" and full.input_ids[:len(ids)] == ids
    assert full.input_ids[len(ids):] == tok.ids("a2") + [1]


def test_official_masking_rule_on_a_byte_level_bpe_tokenizer():
    """The rule of MoE-LLaVA's ``preprocess_phi`` (rewritten here from its description, as the reference): per
    round split at eos, ``round_len = len(tok(round)) + 1``, ignore ``len(tok(instruction incl. "ASSISTANT: "))
    - 1`` tokens. On a byte-level BPE tokenizer (Phi-2 / Qwen / StableLM-2 style, trained here in memory) the zoo's
    labels and ids equal the rule's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = [CHAT_SYSTEM, "USER: What is in the picture? ASSISTANT: A dog runs on the grass.",
              "USER: Is it big? ASSISTANT: Yes, quite big."] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok = HFTokenizer(hf)
    c = conv("<image>\nWhat is in the picture?", "A dog runs on the grass.", "Is it big?", "Yes, quite big.")
    template = get_template("phi")
    ours = template.encode(c, tok)

    def tok_image(text):  # the official tokenizer_image_token for a tokenizer without bos
        ids = []
        for k, chunk in enumerate(text.split("<image>")):
            ids += ([IMAGE_TOKEN_ID] if k else []) + hf(chunk).input_ids
        return ids

    prompt = template.render(c)
    ids = tok_image(prompt)
    labels = list(ids)
    cur = 0
    for rou in prompt.split("<|endoftext|>"):
        if not rou:
            break
        head, _ = rou.split(" ASSISTANT: ")
        round_len, instruction_len = len(tok_image(rou)) + 1, len(tok_image(head + " ASSISTANT: ")) - 1
        labels[cur:cur + instruction_len] = [X] * instruction_len
        cur += round_len
    assert cur == len(ids)
    assert ours.input_ids == ids
    assert ours.labels == labels


def test_compact_tokenizer_from_train_text_only_and_state_round_trip():
    t = get_template("tiny")
    train = [conv("<image>\nWhat digit is this?", "7"), conv("<image>\nWhich digit?", "3")]
    tok = CompactTokenizer.build(x for c in train for x in t.texts(c))
    assert tok.vocab_size == CompactTokenizer.SPECIAL + len(tok.bpe_ids)
    enc = t.encode(train[0], tok)
    assert tok.decode(enc.input_ids, stop_at_eos=False) == "user : what digit is this ? assistant : 7"
    unseen = tok.encode("what zebra")
    assert unseen[1] == CompactTokenizer.UNK and unseen[0] >= CompactTokenizer.SPECIAL
    assert tok.decode(unseen) == "what <unk>"
    again = CompactTokenizer.from_state_dict(tok.state_dict())
    assert again == tok and again.encode("which digit is this") == tok.encode("which digit is this")
    with pytest.raises(ValueError, match="not a CompactTokenizer state"):
        CompactTokenizer.from_state_dict({"kind": "other"})


@pytest.mark.parametrize("turns,match", [
    ([], "non-empty list"),
    (conv("<image> only a question"), "no 'gpt' turn"),
    ([{"from": "gpt", "value": "hello"}], "no 'gpt' turn"),  # a leading gpt turn is dropped, as the official code
    (conv("q", "a", "q2"), "last turn is a human turn"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "alternate"),
    ([{"from": "system", "value": "q"}, {"from": "gpt", "value": "a"}], "'human' or 'gpt'"),
    ([{"from": "human"}], "keys 'from' and 'value'"),
    (conv("q", "answer <image>"), "media tag in an assistant answer"),
])
def test_bad_conversations_are_named(turns, match):
    with pytest.raises(ConversationError, match=match):
        get_template("tiny").encode(turns, WordTokenizer(), sample="sample 7")


def test_leading_gpt_turn_is_dropped_like_the_official_code():
    tok = WordTokenizer()
    t = get_template("tiny")
    assert t.encode([{"from": "gpt", "value": "hi"}, *conv("q", "a")], tok).input_ids == t.encode(conv("q", "a"),
                                                                                                   tok).input_ids


def test_unknown_template_and_registry():
    assert set(TEMPLATES) >= {"plain", "stablelm", "phi", "qwen", "tiny", "tiny_plain"}
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        get_template("vicuna")


def test_constants_agree_with_the_model_side_when_present():
    mm = pytest.importorskip("zoo.models.multimodal", reason="zoo/models/multimodal.py (h-llava) not merged here yet")
    assert (mm.IGNORE_INDEX, mm.IMAGE_TOKEN_ID, mm.AUDIO_TOKEN_ID) == (IGNORE_INDEX, IMAGE_TOKEN_ID, AUDIO_TOKEN_ID)
