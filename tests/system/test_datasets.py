"""Dataset plugins for real formats (llava_json, m3it, vqa, coco_captions) against Python reading the same files.

tests/fixtures/make_datasets.py writes tiny datasets with their edge cases; `component_probe dataset` builds
each through the plugin host and writes every sample (or its SampleError) and the report. Here Python reads
the same files its own way and the two must agree: ids, prompts, targets, references, metadata, decoded
pixels (equal to Pillow's, by SHA-256 of the RGB array), the VizWiz target rule and its counts, and the
errors: a missing or corrupt image is a SampleError naming the sample and the path; a broken file is exit
status 2 with one line naming the file and the line.
"""
import base64
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest
from collections import Counter

import numpy as np
from PIL import Image

from ablate_testing import PROBE, SOURCE

FIXTURES = SOURCE / "tests" / "fixtures" / "make_datasets.py"


# ---- Python's reading of the formats

def pillow_image(source):
    """(shape, sha256) of the RGB pixels Pillow decodes, or None when Pillow cannot read it."""
    try:
        with Image.open(source if isinstance(source, (str, pathlib.Path)) else io.BytesIO(source)) as im:
            pixels = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return list(pixels.shape), hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def inside(root, name):
    path = os.path.normpath(os.path.join(root, name))
    return path if os.path.commonpath([root, path]) == root and path != root else None


def llava_reference(root, o):
    entries = json.loads((root / o["file"]).read_text())
    images = os.path.normpath(root / o.get("image_folder", pathlib.Path(o["file"]).parent))
    user, assistant, sep = o.get("user_prefix", "USER: "), o.get("assistant_prefix", " ASSISTANT:"), o.get("separator", "\n")
    samples = []
    report = Counter(entries_read=0, exchanges=0, multi_turn_entries=0, text_only_entries=0, image_without_token=0,
                     unanswered_last_turn=0, turns_not_used=0)
    for e in entries:
        if o.get("limit") and len(samples) >= o["limit"]:
            break
        report["entries_read"] += 1
        values = []
        for turn in e["conversations"]:
            v = turn["value"]
            if "<image>" in v:
                v = "<image>\n" + v.replace("<image>", "").strip()
            values.append(v)
        exchanges = len(values) // 2
        report["exchanges"] += exchanges
        report["multi_turn_entries"] += exchanges > 1
        report["text_only_entries"] += "image" not in e
        report["unanswered_last_turn"] += len(values) % 2
        report["image_without_token"] += "image" in e and not any("<image>" in v for v in values)
        context = ""
        for j in range(exchanges):
            if j > 0 and o.get("turns") == "first":
                report["turns_not_used"] += exchanges - j
                break
            if o.get("limit") and len(samples) >= o["limit"]:
                break
            prompt = context + user + values[2 * j] + assistant
            target = values[2 * j + 1]
            context = prompt + " " + target + sep
            sid = str(e["id"]) if j == 0 else f"{e['id']}#{j + 1}"
            path = inside(images, e["image"]) if "image" in e else None
            samples.append({"id": sid, "prompt": prompt, "target": target, "references": [target],
                            "metadata": {"turn": j + 1, "turns": exchanges, "has_image": "image" in e},
                            "image_path": path, "image": pillow_image(path) if path else ([0, 0, 3], hashlib.sha256(b"").hexdigest())})
    report["samples"] = len(samples)
    return samples, dict(report)


def m3it_reference(root, o, names):
    template = o.get("prompt", "##Instruction: {instruction} ##Question: {inputs} ##Answer:")
    samples = []
    report = Counter(lines_read=0, text_only=0, multi_image=0, png=0, jpeg=0, not_png_or_jpeg=0)
    per_file = {}
    for f, name in zip(o["files"], names):
        per_file[name] = 0
        for number, line in enumerate((root / f).read_text().split("\n"), start=1):
            if not line.strip():
                continue
            report["lines_read"] += 1
            row = json.loads(line)
            imgs = [base64.b64decode(s) for s in row["image_base64_str"]]
            sample = {"id": f"{name}:{number}", "prompt": template.format(instruction=row["instruction"], inputs=row["inputs"]),
                      "target": row["outputs"], "references": [row["outputs"]], "metadata": {"source": name, "images": len(imgs)},
                      "image_path": f"{root / f}:{number}: image_base64_str[0]"}
            if imgs:
                sample["image"] = pillow_image(imgs[0])
                kind = "png" if imgs[0].startswith(b"\x89PNG") else "jpeg" if imgs[0].startswith(b"\xff\xd8\xff") else "not_png_or_jpeg"
                report[kind] += 1
            else:
                sample["image"] = ([0, 0, 3], hashlib.sha256(b"").hexdigest())
                report["text_only"] += 1
            report["multi_image"] += len(imgs) > 1
            samples.append(sample)
            per_file[name] += 1
    report = dict(report, samples=len(samples), per_file=per_file)
    return samples, report


def vizwiz_target(answers, mode):
    """The rule as the VizWiz write-up states it, written out independently of the plugin."""
    counts = Counter(a["answer"] for a in answers)
    yes = Counter(a["answer"] for a in answers if a.get("answer_confidence") == "yes")
    order = list(dict.fromkeys(a["answer"] for a in answers))
    if mode == "vizwiz":
        for level, rule in ((3, "3_or_more"), (2, "2")):
            candidates = [a for a in order if counts[a] >= level]
            if candidates:
                best = max(candidates, key=lambda a: (yes[a], counts[a], -order.index(a)))
                return best, rule, counts[best], len(candidates)
    best = max(order, key=lambda a: (counts[a], yes[a], -order.index(a)))
    return best, ("no_agreement" if mode == "vizwiz" else "most_common"), counts[best], 0


def vqa_reference(root, o):
    mode = o.get("targets", "vizwiz")
    keep = o.get("keep_no_agreement", False)
    template = o.get("prompt", "Question: {question} Answer:")
    report = Counter(read=0, filtered_out=0, no_answers=0)
    if mode == "vizwiz":
        report.update({"target_3_or_more": 0, "target_2": 0, "several_candidates": 0,
                       ("kept_no_agreement" if keep else "dropped_no_agreement"): 0})
    else:
        report["target_most_common"] = 0
    rows = []
    if o.get("format", "vqa") == "vqa":
        questions = json.loads((root / o["questions"]).read_text())
        annotations = {a["question_id"]: a for a in json.loads((root / o["annotations"]).read_text())["annotations"]}
        images = os.path.normpath(root / o["image_folder"])
        for q in questions["questions"]:
            a = annotations[q["question_id"]]
            keep_row = (not o.get("question_types") or a["question_type"] in o["question_types"]) and \
                       (not o.get("answer_types") or a["answer_type"] in o["answer_types"])
            meta = {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": a["question_type"],
                    "answer_type": a["answer_type"], "multiple_choice_answer": a["multiple_choice_answer"]}
            name = f"COCO_{questions['data_subtype']}_{q['image_id']:012d}.jpg"
            rows.append((keep_row, str(q["question_id"]), q["question"], os.path.join(images, name), a["answers"], meta))
    else:
        images = os.path.normpath(root / o["image_folder"])
        for e in json.loads((root / o["file"]).read_text()):
            answerable = bool(e["answerable"])
            keep_row = ("answerable" not in o or o["answerable"] == answerable) and \
                       (not o.get("answer_types") or e["answer_type"] in o["answer_types"])
            meta = {"image": e["image"], "answerable": answerable, "answer_type": e["answer_type"]}
            rows.append((keep_row, pathlib.Path(e["image"]).stem, e["question"], os.path.join(images, e["image"]), e["answers"], meta))
    samples = []
    for keep_row, sid, question, path, answers, meta in rows:
        report["read"] += 1
        if not keep_row:
            report["filtered_out"] += 1
            continue
        target, rule, count, candidates = vizwiz_target(answers, mode)
        if rule == "no_agreement" and not keep:
            report["dropped_no_agreement"] += 1
            continue
        report[{"3_or_more": "target_3_or_more", "2": "target_2", "most_common": "target_most_common"}.get(rule, "kept_no_agreement")] += 1
        report["several_candidates"] += candidates > 1 and mode == "vizwiz"
        samples.append({"id": sid, "prompt": template.format(question=question), "target": target,
                        "references": [a["answer"] for a in answers],
                        "metadata": dict(meta, target_rule=rule, target_count=count), "image_path": path, "image": pillow_image(path)})
    if mode != "vizwiz":
        del report["several_candidates"]
    report["samples"] = len(samples)
    return samples, dict(report)


def coco_reference(root, o):
    data = json.loads((root / o["file"]).read_text())
    images = os.path.normpath(root / o["image_folder"])
    index = o.get("target_index", 0)
    captions = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    samples = []
    clamped = no_captions = 0
    for im in data["images"]:
        caps = captions.get(im["id"], [])
        if not caps:
            no_captions += 1
            continue
        clamped += index >= len(caps)
        path = os.path.join(images, im["file_name"])
        samples.append({"id": str(im["id"]), "prompt": o.get("prompt", ""), "target": caps[min(index, len(caps) - 1)], "references": caps,
                        "metadata": {"image_id": im["id"], "file_name": im["file_name"], "captions": len(caps)},
                        "image_path": path, "image": pillow_image(path)})
    report = {"images_read": len(data["images"]), "captions": len(data["annotations"]), "samples": len(samples),
              "no_captions": no_captions, "target_index_clamped": clamped}
    return samples, report


# ---- the tests

class DatasetPluginsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="ablate-datasets-")
        cls.root = pathlib.Path(cls._tmp.name).resolve()
        subprocess.run([sys.executable, str(FIXTURES), str(cls.root)], check=True)
        cls.cases = json.loads((cls.root / "cases.json").read_text())

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def probe(self, name, plugin, options):
        """Runs the probe with `options` written next to the data; returns (returncode, output or None, stderr)."""
        opts = self.root / f"{name}.options.json"
        out = self.root / f"{name}.out.json"
        opts.write_text(json.dumps(options))
        if out.exists():
            out.unlink()
        p = subprocess.run([str(PROBE), "dataset", plugin, str(opts), str(out)], capture_output=True, text=True, timeout=120)
        return p.returncode, (json.loads(out.read_text()) if p.returncode == 0 else None), p.stderr

    def check(self, name, expected_samples, expected_report, extra_options=None):
        case = self.cases["ok"][name]
        options = dict(case["options"], **(extra_options or {}))
        rc, got, err = self.probe(name, case["plugin"], options)
        self.assertEqual(rc, 0, err)
        self.assertEqual(got["report"], expected_report, name)
        self.assertEqual(got["size"], len(expected_samples), name)
        self.assertEqual(len(got["samples"]), len(expected_samples), name)
        errors = 0
        for k, (ours, ref) in enumerate(zip(got["samples"], expected_samples)):
            where = f"{name}[{k}] {ref['id']}"
            if ref["image"] is None:
                # Pillow cannot read it either: a SampleError that names the sample and where the image is.
                errors += 1
                self.assertIn("error", ours, where)
                self.assertEqual(ours["error"]["sample_id"], ref["id"], where)
                self.assertIn(ref["id"], ours["error"]["message"], where)
                self.assertIn(str(ref["image_path"]), ours["error"]["message"], where)
                continue
            self.assertNotIn("error", ours, where)
            for key in ("id", "prompt", "target", "references", "metadata"):
                self.assertEqual(ours[key], ref[key], f"{where}: {key}")
            self.assertEqual(ours["image"]["shape"], ref["image"][0], where)
            self.assertEqual(ours["image"]["sha256"], ref["image"][1], f"{where}: pixels differ from Pillow's")
        return got, errors

    def test_llava_json(self):
        samples, report = llava_reference(self.root, self.cases["ok"]["llava"]["options"])
        got, errors = self.check("llava", samples, report)
        ids = [s["id"] for s in samples]
        # Multi-turn: one sample per gpt turn, the earlier turns in the prompt.
        self.assertEqual(ids[:5], ["single", "multi", "multi#2", "multi#3", "42"])
        self.assertEqual(got["samples"][3]["prompt"],
                         "USER: <image>\nWhat colour dominates? ASSISTANT: Red.\nUSER: And at the bottom? ASSISTANT: Green.\n"
                         "USER: Is it noisy? ASSISTANT:")
        self.assertEqual(got["samples"][4]["image"]["shape"], [0, 0, 3])  # text-only
        self.assertEqual(errors, 3)  # missing.jpg, corrupt.jpg, truncated.png
        self.assertEqual(report["multi_turn_entries"], 1)
        self.assertEqual(report["text_only_entries"], 1)
        samples, report = llava_reference(self.root, self.cases["ok"]["llava_first"]["options"])
        got, _ = self.check("llava_first", samples, report)
        self.assertEqual([s["id"] for s in got["samples"]], ["single", "multi", "42", "no-token"])
        self.assertEqual(got["samples"][1]["prompt"], "<image>\nWhat colour dominates?")

    def test_m3it(self):
        samples, report = m3it_reference(self.root, self.cases["ok"]["m3it"]["options"], ["coco/train", "vqa-v2/train"])
        got, errors = self.check("m3it", samples, report)
        self.assertEqual([s["id"] for s in samples], ["coco/train:1", "coco/train:2", "coco/train:4", "coco/train:5",
                                                       "coco/train:6", "coco/train:7", "coco/train:8", "vqa-v2/train:1",
                                                       "vqa-v2/train:2"])
        self.assertEqual(errors, 3)  # base64 of bytes that are no image; two headers claiming too many pixels
        for k, size in ((5, "100000 x 100000"), (6, "65000 x 65000")):
            self.assertIn(f"image of {size} pixels, over the 178956970 that Pillow refuses", got["samples"][k]["error"]["message"])
        self.assertGreaterEqual(report["png"], 2)
        self.assertGreaterEqual(report["jpeg"], 2)
        samples, report = m3it_reference(self.root, self.cases["ok"]["m3it_prompt"]["options"], ["train"])
        self.check("m3it_prompt", samples, report)

    def test_vqa(self):
        for name in ("vqa", "vqa_keep", "vqa_most_common", "vqa_other"):
            with self.subTest(name):
                samples, report = vqa_reference(self.root, self.cases["ok"][name]["options"])
                got, errors = self.check(name, samples, report)
                self.assertEqual(errors, 2)  # the missing and the corrupt COCO image
        samples, report = vqa_reference(self.root, self.cases["ok"]["vqa"]["options"])
        targets = {s["id"]: (s["target"], s["metadata"]["target_rule"]) for s in samples}
        self.assertEqual(targets["11"], ("blue", "3_or_more"))   # tie at four, broken by "yes"
        self.assertEqual(targets["17"], ("no idea", "3_or_more"))  # more "yes" beats more annotators
        self.assertEqual(targets["12"], ("3", "2"))               # only two agree
        self.assertNotIn("13", targets)                            # no agreement: not trained on
        self.assertEqual(report, {"read": 8, "filtered_out": 0, "no_answers": 0, "target_3_or_more": 6, "target_2": 1,
                                  "dropped_no_agreement": 1, "several_candidates": 3, "samples": 7})
        self.assertEqual(len(samples[0]["references"]), 10)

    def test_vizwiz(self):
        for name in ("vizwiz", "vizwiz_answerable", "vizwiz_unanswerable"):
            with self.subTest(name):
                samples, report = vqa_reference(self.root, self.cases["ok"][name]["options"])
                self.check(name, samples, report)
        samples, report = vqa_reference(self.root, self.cases["ok"]["vizwiz"]["options"])
        targets = {s["id"]: s["target"] for s in samples}
        self.assertEqual(targets["VizWiz_train_00000000"], "beef chuck steak")
        self.assertEqual(targets["VizWiz_train_00000001"], "unanswerable")
        self.assertEqual(targets["VizWiz_train_00000002"], "lemon")
        self.assertEqual(targets["VizWiz_train_00000004"], "yes")  # equal in count and "yes": the first given
        self.assertEqual(report["dropped_no_agreement"], 1)
        self.assertEqual(report["target_2"], 1)
        _, report = vqa_reference(self.root, self.cases["ok"]["vizwiz_unanswerable"]["options"])
        self.assertEqual((report["samples"], report["filtered_out"]), (1, 5))

    def test_coco_captions(self):
        for name in ("coco", "coco_index"):
            with self.subTest(name):
                samples, report = coco_reference(self.root, self.cases["ok"][name]["options"])
                got, errors = self.check(name, samples, report)
                self.assertEqual(errors, 1)  # missing.jpg
        samples, report = coco_reference(self.root, self.cases["ok"]["coco"]["options"])
        self.assertEqual(report["no_captions"], 1)
        self.assertEqual((samples[0]["target"], len(samples[0]["references"])), ("A noisy gradient.", 5))
        samples, report = coco_reference(self.root, self.cases["ok"]["coco_index"]["options"])
        self.assertEqual([s["target"] for s in samples[:2]], ["A picture.", "Colours fading."])
        self.assertEqual(report["target_index_clamped"], 2)

    def test_malformed_files_name_file_and_line(self):
        for name, case in self.cases["bad"].items():
            with self.subTest(name):
                rc, _, err = self.probe(name, case["plugin"], case["options"])
                self.assertEqual(rc, 2, err)
                lines = [l for l in err.splitlines() if l.startswith("component_probe:")]
                self.assertEqual(len(lines), 1, err)
                self.assertIn(f"{self.root / case['file']}:{case['line']}:", lines[0])

    def test_bad_options_and_check_images(self):
        llava = self.cases["ok"]["llava"]["options"]
        for name, plugin, options, needle in [
            ("unknown_key", "llava_json", dict(llava, turn="all"), "turn"),
            ("bad_turns", "llava_json", dict(llava, turns="last"), "turns"),
            ("bad_prompt", "vqa", dict(self.cases["ok"]["vqa"]["options"], prompt="Q: {questoin}"), "questoin"),
            # A pad no file name can hold (it used to build a string of that many zeros, a billion here).
            ("wide_pad", "vqa", dict(self.cases["ok"]["vqa"]["options"], image_pattern="{image_id:01000000000}.jpg"),
             "image_pattern: field {image_id:01000000000}: pads to more digits than a file name can hold"),
            ("vizwiz_no_question_types", "vqa", dict(self.cases["ok"]["vizwiz"]["options"], question_types=["what"]), "question_types"),
            ("missing_file", "coco_captions", {"file": "nowhere.json"}, "nowhere.json"),
            ("check_images", "llava_json", dict(llava, check_images=True), "missing.jpg"),
        ]:
            with self.subTest(name):
                rc, _, err = self.probe(name, plugin, options)
                self.assertEqual(rc, 2, err)
                self.assertIn(needle, err)


if __name__ == "__main__":
    unittest.main()
