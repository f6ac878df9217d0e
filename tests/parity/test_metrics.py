"""Metric parity: ablate's metric plugins, run through `component_probe metric`, give the official scorers'
numbers. BLEU-1..4, ROUGE-L and CIDEr-D against pycocoevalcap (the corpus values and every per-sample score,
within 1e-6) on hundreds of random caption sets; vqa_accuracy against a transcription of the official VQA
evaluation (below, within 1e-12) on thousands of answers built to hit its normalisation rules."""
import json
import random
import re
import subprocess
import unittest

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from ablate_testing import PROBE, TempDirTest

# ---- The official VQA accuracy: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00
# ("Fixed processing answers bug", 2021), VQAEval.evaluate() for one question plus processPunctuation and
# processDigitArticle, transcribed from Python 2 with the tables copied as they are. One change: the
# original ran under Python 2, where \d in a str pattern is [0-9]; re.ASCII keeps that meaning here.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(in_text):
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) != None):  # noqa: E711
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    out_text = PERIOD_STRIP.sub("", out_text, re.UNICODE)  # sic: re.UNICODE (32) is sub()'s `count`
    return out_text


def process_digit_article(in_text):
    out_text = []
    temp_text = in_text.lower().split()
    for word in temp_text:
        word = MANUAL_MAP.setdefault(word, word)
        if word not in ARTICLES:
            out_text.append(word)
        else:
            pass
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    out_text = " ".join(out_text)
    return out_text


def official_vqa_accuracy(res_ans, gt_answer_strings):
    """evaluate()'s loop body for one question; the answers are dicts with distinct ids as in the annotations."""
    answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answer_strings)]
    for ans_dic in answers:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ")
        ans_dic["answer"] = ans_dic["answer"].replace("\t", " ")
        ans_dic["answer"] = ans_dic["answer"].strip()
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    gt_acc = []
    gt_answers = [ans["answer"] for ans in answers]

    if len(set(gt_answers)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = process_punctuation(ans_dic["answer"])
            ans_dic["answer"] = process_digit_article(ans_dic["answer"])
        res_ans = process_punctuation(res_ans)
        res_ans = process_digit_article(res_ans)

    for gt_ans_datum in answers:
        other_gt_ans = [item for item in answers if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        acc = min(1, float(len(matching_ans)) / 3)
        gt_acc.append(acc)
    return float(sum(gt_acc)) / len(gt_acc)


def expected_vqa_accuracy(prediction, answers):
    """The official accuracy on any number of answers (leave-one-out over however many there are), and
    ablate's rule where the official formula has nothing to leave one out of (see vqa_accuracy.cpp): a single
    answer scores as exact match after the same normalisation; no answers score 0."""
    if not answers:
        return 0.0
    if len(answers) == 1:
        def norm(s):
            return process_digit_article(process_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))
        return float(norm(prediction) == norm(answers[0]))
    return official_vqa_accuracy(prediction, answers)


# ---- Random inputs
# Words with Zipf-like frequencies, so that n-grams repeat within and across caption sets.
VOCAB = ("a the man woman dog cat is sitting on of in with near red blue two white black table street car bench "
         "standing large small picture room people grass next to an holding green field riding bus train").split()
ODD_SPACES = ["  ", "\t", " \n ", "\u00a0", "   ", "\u3000"]


def caption_sets(n, seed, max_refs=5):
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(VOCAB))]

    def sentence(lo, hi):
        return rng.choices(VOCAB, weights, k=rng.randint(lo, hi))

    def mutate(words):
        out = []
        for w in words:
            r = rng.random()
            if r < 0.1:
                continue  # dropped
            out.append(rng.choice(VOCAB) if r < 0.25 else w)
            if rng.random() < 0.08:
                out.append(rng.choice(VOCAB))
        if len(out) > 1 and rng.random() < 0.3:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        return out

    def join(words):
        if rng.random() < 0.05 and words:  # irregular whitespace: str.split() and split(" ") see it differently
            text = "".join(w + (rng.choice(ODD_SPACES) if rng.random() < 0.3 else " ") for w in words)
            return (" " if rng.random() < 0.5 else "") + text
        return " ".join(words)

    predictions, references = [], []
    for _ in range(n):
        refs = [sentence(0 if rng.random() < 0.02 else 1, 16) for _ in range(rng.randint(1, max_refs))]
        kind = rng.random()
        if kind < 0.06:
            pred = []
        elif kind < 0.16:
            pred = sentence(1, 2)
        elif kind < 0.26:
            pred = list(rng.choice(refs))  # an exact copy
        elif kind < 0.75:
            pred = mutate(rng.choice(refs))
        else:
            pred = sentence(1, 18)
        predictions.append(join(pred))
        references.append([join(r) for r in refs])
    return predictions, references


VQA_BASE = ["yes", "no", "2", "two", "none", "0", "zero", "1", "one", "10", "ten", "the dog", "a dog", "dog", "dogs",
            "an apple", "apple", "it's", "its", "dont", "don't", "1,000", "1000", "1 000", "3.5", "35", "3 5", "a/b",
            "a b", "b", "#", "# 1", "#1", "red", "left-handed", "left handed", "t-shirt", "tshirt", "t shirt", "2:30",
            "$5", "5.00", "50%", "e.g.", "mr. smith", "u.s.", "us", "black and white", "black & white", "hello world",
            "whats", "Im", "im", "i'm", "none of the above", "2 dogs", "two dogs", "threes", "the", "a", "an", "",
            "nothing", "1,2", "a,b", "1, 2", "3.14", ".5", "5.", "1.5.2", "x=y", "x = y", "<none>", "[1]", "{}",
            '"quoted"', "`tick`", "under_score", "back\\slash", "semi;colon", "dot.com", "what?", "no!", "@home"]
# Answers that some rule of the normalisation makes equal, or keeps apart.
VQA_CONFUSABLE = [["1,000", "1000", "1 000", "1.000"], ["3.5", "35", "3 5", "3,5"], ["a/b", "a b", "b", "ab"],
                  ["left-handed", "left handed", "lefthanded"], ["t-shirt", "tshirt", "t shirt"],
                  ["it's", "its", "it s", "it is"], ["dont", "don't", "do not"], ["two", "2", "2.", "two."],
                  ["none", "0", "zero", "no"], ["the dog", "dog", "a dog", "dog."], ["yes.", "yes", "Yes!", "yes,"],
                  ["1,2", "1 2", "12", "1, 2"], ["red-1,000", "red 1000", "red1000", "red-1000"], ["#1", "# 1", "1"],
                  ["x=y", "x y", "xy", "x = y"], ["e.g.", "eg", "e g"], ["(yes)", "yes", "( yes )"],
                  ["red/blue / green", "redblue green", "red blue green"], ["x=y = z", "xy z", "x y z", "x=y=z"]]
VQA_POOL = VQA_BASE + list(MANUAL_MAP) + list(MANUAL_MAP.values()) + list(CONTRACTIONS) + list(CONTRACTIONS.values())


def vqa_cases(n, seed):
    rng = random.Random(seed)

    def decorate(a):
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            r = rng.randrange(14)
            if r == 0:
                a = rng.choice([a.upper(), a.title(), a.capitalize()])
            elif r == 1:
                a = a + rng.choice([".", "!", "?", "..", " .", "?!", ",", " ,", "...", "."])
            elif r == 2:
                left, right = rng.choice(["()", '""', "[]", "<>", "{}", "``", "__", "--"])
                a = left + a + right
            elif r == 3:
                a = rng.choice(["the ", "a ", "an ", "The ", "A "]) + a
            elif r == 4:
                a = rng.choice([" ", "\n", "\t", "  ", "\u00a0", " \t"]) + a + rng.choice(["", " ", "\n", "\t "])
            elif r == 5:
                a = a.replace(" ", rng.choice(["-", "/", "_", ", ", " , ", ";", "  ", " - ", "+", "=", "\t"]))
            elif r == 6:
                words = a.split(" ")
                a = " ".join(MANUAL_MAP.get(w, {v: k for k, v in MANUAL_MAP.items()}.get(w, w)) for w in words)
            elif r == 7:
                a = "." * rng.randint(28, 40) + a + rng.choice(["", "5", ".5"])
            elif r == 8:
                i = rng.randint(0, len(a))
                a = a[:i] + rng.choice(PUNCT + [".", "'", ":", "#", "$", "%", "&", "*"]) + a[i:]
            elif r == 9:
                a = a + " " + rng.choice(["1,000", "3.5", "2", "two", "a", "the", "dont", "yes."])
            elif r == 10:
                a = rng.choice(["1,0", "9,9 ", "0.5 "]) + a
            elif r == 11:
                a = a.replace("'", "")  # "don't" -> "dont", which the contractions table maps back
            elif r == 12:
                a = rng.choice(["", "(", "yes-", "red/"]) + a + rng.choice(["-1,000", " 1,000!", "(2,5)", "/4,2", " 1,0"])
            else:
                a = a.lower()
        return a

    cases = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            cluster = rng.choice(VQA_CONFUSABLE)
        else:
            cluster = rng.sample(VQA_BASE if r < 0.7 else VQA_POOL, rng.choice([1, 1, 2, 2, 3, 4]))
        count = 10 if rng.random() < 0.85 else rng.randint(0 if rng.random() < 0.1 else 1, 9)
        r = rng.random()
        if r < 0.25:
            answers = [decorate(rng.choice(cluster))] * count  # unanimous: the official code normalises nothing
        elif r < 0.5:
            answers = [rng.choice(cluster) for _ in range(count)]
        else:
            answers = [decorate(rng.choice(cluster)) for _ in range(count)]
        r = rng.random()
        if r < 0.2 and answers:
            prediction = rng.choice(answers)
        elif r < 0.7:
            prediction = decorate(rng.choice(cluster))
        else:
            prediction = decorate(rng.choice(VQA_POOL))
        cases.append((prediction, answers))
    return cases


class MetricParityTest(TempDirTest):
    def ours(self, metric, predictions, references, options=None):
        """{name: (value, per_sample)} from component_probe metric."""
        (self.dir / "options.json").write_text(json.dumps(options or {}))
        (self.dir / "in.json").write_text(json.dumps({"predictions": predictions, "references": references}))
        out = subprocess.run([str(PROBE), "metric", metric, str(self.dir / "options.json"), str(self.dir / "in.json"),
                              str(self.dir / "out.json")], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        return {v["name"]: (v["value"], v["per_sample"]) for v in json.loads((self.dir / "out.json").read_text())}

    def test_captions_match_pycocoevalcap(self):
        # Two large sets, small ones (CIDEr's idf depends on the set size: one sample gives 0), and sets whose
        # predictions are all empty or all exact copies.
        sets = [caption_sets(600, 0), caption_sets(400, 1, max_refs=2), caption_sets(1, 2), caption_sets(2, 3),
                caption_sets(7, 4)]
        preds, refs = caption_sets(50, 5)
        sets += [([""] * len(preds), refs), ([r[0] for r in refs], refs)]
        worst = {}
        samples = 0
        for s, (preds, refs) in enumerate(sets):
            gts = {i: r for i, r in enumerate(refs)}
            res = {i: [p] for i, p in enumerate(preds)}
            expected = {}
            bleu, bleu_per_sample = Bleu(4).compute_score(gts, res, verbose=0)
            for k in range(4):
                expected[f"bleu_{k + 1}"] = (bleu[k], bleu_per_sample[k])
            expected["rouge_l"] = Rouge().compute_score(gts, res)
            expected["cider"] = Cider().compute_score(gts, res)
            got = self.ours("bleu", preds, refs)
            got.update(self.ours("rouge_l", preds, refs))
            got.update(self.ours("cider", preds, refs))
            samples += len(preds)
            for name, (value, per_sample) in expected.items():
                self.assertIn(name, got)
                ours_value, ours_per_sample = got[name]
                self.assertEqual(len(ours_per_sample), len(per_sample), name)
                diffs = [abs(float(value) - ours_value)] + [abs(float(a) - b) for a, b in zip(per_sample, ours_per_sample)]
                i = max(range(len(diffs)), key=diffs.__getitem__)
                if diffs[i] > worst.get(name, (0.0,))[0] or name not in worst:
                    worst[name] = (diffs[i], s, i - 1)
        for name, (diff, s, i) in sorted(worst.items()):
            where = "corpus value" if i < 0 else f"sample {i}"
            print(f"{name}: worst difference {diff:.3g} (set {s}, {where})")
        print(f"{len(sets)} caption sets, {samples} samples")
        for name, (diff, s, i) in worst.items():
            self.assertLess(diff, 1e-6, f"{name}: set {s}, " + ("corpus value" if i < 0 else f"sample {i}: "
                            f"{sets[s][0][i]!r} vs {sets[s][1][i]!r}"))

    def test_vqa_accuracy_matches_the_official_evaluation(self):
        cases = vqa_cases(3000, 7)
        predictions = [p for p, _ in cases]
        references = [a for _, a in cases]
        value, per_sample = self.ours("vqa_accuracy", predictions, references)["vqa_accuracy"]
        expected = [expected_vqa_accuracy(p, a) for p, a in cases]
        diffs = [abs(a - b) for a, b in zip(expected, per_sample)]
        bad = [i for i, d in enumerate(diffs) if d > 1e-12]
        for i in bad[:10]:
            print(f"differs: {predictions[i]!r} vs {references[i]!r}: ours {per_sample[i]}, official {expected[i]}")
        unanimous = sum(1 for a in references if len(a) > 1 and len(set(x.replace("\n", " ").replace("\t", " ").strip() for x in a)) == 1)
        print(f"vqa_accuracy: {len(cases)} cases ({sum(1 for a in references if len(a) < 10)} with fewer than 10 "
              f"answers, {unanimous} unanimous), {sum(1 for e in expected if 0 < e < 1)} partly right, "
              f"{sum(1 for e in expected if e == 1)} right; worst difference {max(diffs):.3g}, {len(bad)} over 1e-12")
        self.assertEqual(len(per_sample), len(cases))
        self.assertEqual(bad, [])
        self.assertAlmostEqual(value, sum(expected) / len(expected), delta=1e-12)


if __name__ == "__main__":
    unittest.main()
