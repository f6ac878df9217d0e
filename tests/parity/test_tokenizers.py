"""Tokenizer parity: ablate gives the same ids as the `tokenizers` library (and, for SentencePiece models, as
transformers' LlamaTokenizer built on it) on thousands of strings with unicode, runs of whitespace, emoji and
special tokens; decoding gives the same text. Every tokenizer is trained here by the reference libraries."""
import json
import random
import subprocess
import unittest

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer

from ablate_testing import PROBE, TempDirTest

WORDS = ("the quick brown fox jumps over the lazy dog hello world don't it's we're I'll DON'T 123 4567 89 "
         "naïve café über straße Ελληνικά русский 中文 测试 日本語 한국어 🤗 ☃ 👍🏽 a b c x y z").split()
SPACES = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\u00a0", "\u3000", "", "\r\n"]
PUNCT = [",", ".", "!", "?", "...", "'", "\"", "(", ")", "-", "$$", "#", "@"]


def corpus(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def random_texts(n, specials, seed):
    rng = random.Random(seed)
    pieces = WORDS + PUNCT + specials + ["'s", "'T", "'LL", "\u017ft", "x2y", "½", "²", "٣", "Σ", "İ"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            parts.append(rng.choice(pieces))
            parts.append(rng.choice(SPACES))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = rng.choice(SPACES) + text
        texts.append(text)
    return texts


class TokenizerParityTest(TempDirTest):
    def ours(self, tokenizer, texts):
        (self.dir / "in.json").write_text(json.dumps(texts))
        out = subprocess.run([str(PROBE), "tokenize", str(tokenizer), str(self.dir / "in.json"), str(self.dir / "out.json")],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        return json.loads((self.dir / "out.json").read_text())

    def compare(self, name, tokenizer, texts, encode, decode):
        ours = self.ours(tokenizer, texts)
        bad_ids = bad_text = 0
        for i, text in enumerate(texts):
            ref = encode(text)
            if ours["ids"][i] != ref:
                bad_ids += 1
                if bad_ids <= 5:
                    print(f"{name} ids differ for {text!r}:\n  ours {ours['ids'][i]}\n  ref  {ref}")
            elif ours["decoded"][i] != decode(ref):
                bad_text += 1
                if bad_text <= 5:
                    print(f"{name} decode differs for {text!r}: {ours['decoded'][i]!r} vs {decode(ref)!r}")
        print(f"{name}: {len(texts)} strings, {bad_ids} id mismatches, {bad_text} decode mismatches")
        self.assertEqual((bad_ids, bad_text), (0, 0))

    def byte_level(self, name, pre_tokenizer, post_processor=None, ignore_merges=False):
        tok = Tokenizer(models.BPE(unk_token=None, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = post_processor or processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>", "<s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus(3000, 1), trainer)
        tok.add_tokens(["<extra>"])  # a non-special added token, normalized
        path = self.dir / f"{name}.json"
        tok.save(str(path))
        reference = Tokenizer.from_file(str(path))
        texts = random_texts(2000, ["<|endoftext|>", "<s>", "<extra>"], seed=hash(name) % 1000)
        self.compare(name, path, texts, lambda t: reference.encode(t).ids,
                     lambda ids: reference.decode(ids, skip_special_tokens=True))

    def test_gpt2_style_byte_level_bpe(self):
        self.byte_level("gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))

    def test_smollm_style_digits_then_byte_level(self):
        self.byte_level("smollm", pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))

    def test_llama3_style_split_then_byte_level(self):
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        self.byte_level("llama3", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                        post_processor=post, ignore_merges=True)

    def test_sentencepiece_bpe_as_transformers_loads_it(self):
        (self.dir / "corpus.txt").write_text("\n".join(corpus(3000, 2)) + "\n")
        model_dir = self.dir / "llama"
        model_dir.mkdir()
        spm.SentencePieceTrainer.train(
            input=str(self.dir / "corpus.txt"), model_prefix=str(model_dir / "tokenizer"), model_type="bpe", vocab_size=500,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, minloglevel=2)
        (model_dir / "tokenizer.vocab").unlink()
        # As LLaMA-2's tokenizer_config.json has it: BOS added, legacy off.
        (model_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        reference = LlamaTokenizer.from_pretrained(str(model_dir))
        texts = random_texts(2000, ["<s>", "</s>", "<unk>"], seed=11)
        self.compare("sentencepiece", model_dir, texts, lambda t: reference.encode(t),
                     lambda ids: reference.decode(ids, skip_special_tokens=True))


if __name__ == "__main__":
    unittest.main()
