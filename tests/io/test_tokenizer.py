import pytest
from transformers import AutoTokenizer

from kvlab import ConfigError
from kvlab.io.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, render_chat_template


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "naïve café ✓"
    ids = tok.encode(text)
    assert ids[0] == 256 and tok.decode(ids) == text and max(ids) < tok.vocab_size
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    # Its fixed chat format: the generation prompt is a prefix of the rendered answer, which ends in EOS.
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat)
    assert tok.decode(prompt) == "<|user|>\nhi\n<|assistant|>\n"
    done = tok.apply_chat_template(chat + [{"role": "assistant", "content": "yo"}], add_generation_prompt=False)
    assert done[:len(prompt)] == prompt and done[len(prompt):] == [*b"yo", tok.eos_token_id]


def test_smollm2_tokenizer_saves_in_a_layout_autotokenizer_reads(smollm2, tmp_path):
    smollm2.tokenizer.save(tmp_path)
    ours = load_tokenizer(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "KV caches: 23040 bytes per token <|im_end|>"
    assert ours.encode(text) == smollm2.tokenizer.encode(text) == theirs.encode(text)
    msgs = [{"role": "user", "content": "2+2?"}]
    hf_ids = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
    assert ours.apply_chat_template(msgs) == list(hf_ids)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_chat_template_features():
    template = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
                "[{{ m.role }}]{{ m.content | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    out = render_chat_template(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True,
                               bos_token="<s>", eos_token="</s>")
    assert out == '[user]"hi"\n[assistant]'
    with pytest.raises(ConfigError, match="no bad roles"):
        render_chat_template(template, [{"role": "bad", "content": ""}], add_generation_prompt=False,
                             bos_token=None, eos_token=None)


def test_hf_tokenizer_without_template():
    from tokenizers import Tokenizer, models

    tok = HFTokenizer(Tokenizer(models.BPE()))
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
