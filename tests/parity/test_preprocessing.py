"""Image preprocessing parity: pixel values within 1e-2 of transformers' CLIPImageProcessor and
SiglipImageProcessor (their PIL implementations, which is what transformers runs without torchvision) on images
of odd sizes, JPEG (RGB and CMYK) and PNG (RGB, grey, palette, with alpha), made here with Pillow."""
import subprocess
import unittest

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from ablate_testing import PROBE, TempDirTest

SIZES = [(31, 47), (47, 31), (300, 451), (451, 300), (17, 129), (129, 17), (64, 64), (65, 63), (224, 225), (333, 97),
         (13, 13), (500, 120)]


def make_images(folder, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        # Smooth gradients, noise and sharp shapes: every kind of content the resampler can get wrong.
        x = np.linspace(0, 255, w)[None, :, None]
        y = np.linspace(0, 255, h)[:, None, None]
        base = (x * [1, 0.3, 0.7] + y * [0.2, 1, 0.4]) / 1.5 + rng.normal(0, 25, (h, w, 3))
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse([w * 0.2, h * 0.2, w * 0.7, h * 0.6], fill=(220, 30, 40))
        draw.rectangle([w * 0.5, h * 0.5, w * 0.9, h * 0.95], fill=(20, 60, 230))
        kind = i % 5
        if kind == 0:
            path = folder / f"{i:02d}.jpg"
            image.save(path, quality=90)
        elif kind == 1:
            path = folder / f"{i:02d}.png"
            image.save(path)
        elif kind == 2:
            path = folder / f"{i:02d}-grey.png"
            image.convert("L").save(path)
        elif kind == 3:
            path = folder / f"{i:02d}-alpha.png"
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
            rgba.save(path)
        else:
            path = folder / f"{i:02d}-palette.png"
            image.convert("P", palette=Image.ADAPTIVE, colors=64).save(path)
        paths.append(path)
        # A second JPEG of each size (subsampled chroma, another quality), so JPEG decoding is tested often.
        jpeg = folder / f"{i:02d}-q75.jpg"
        image.save(jpeg, quality=75)
        paths.append(jpeg)
        if i % 4 == 0:
            # CMYK, as print workflows save JPEGs (Pillow writes Adobe's inverted samples); they read as RGB.
            cmyk = folder / f"{i:02d}-cmyk.jpg"
            image.convert("CMYK").save(cmyk, quality=90)
            paths.append(cmyk)
    return paths


class PreprocessingParityTest(TempDirTest):
    def compare(self, encoder, model, processor, tolerance=1e-2):
        model.save_pretrained(self.dir / encoder)
        processor.save_pretrained(self.dir / encoder)
        images = self.dir / "images"
        images.mkdir(exist_ok=True)
        paths = make_images(images)
        out = subprocess.run([str(PROBE), "pixels", encoder, str(self.dir / encoder), str(images), str(self.dir / "px.safetensors")],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        ours = load_file(str(self.dir / "px.safetensors"))
        worst = 0.0
        for path in paths:
            ref = processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
            got = ours[path.name]
            self.assertEqual(tuple(got.shape), tuple(ref.shape), path.name)
            diff = (got - ref).abs().max().item()
            worst = max(worst, diff)
            self.assertLessEqual(diff, tolerance, path.name)
        print(f"{encoder}: {len(paths)} images, max abs difference {worst:.3g}")

    def test_clip_image_processor(self):
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=56, patch_size=14))
        self.compare("clip_vit", model, CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}))

    def test_steps_the_config_turns_off(self):
        # do_rescale and do_normalize false: transformers hands the resized pixels on as 0..255 floats. Resizing
        # matches Pillow's within one grey level (so within 1.0 here; the CLIP test's 1e-2 is that level scaled).
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=56, patch_size=14))
        processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                          do_rescale=False, do_normalize=False)
        self.compare("clip_vit", model, processor, tolerance=1.0)
        # Only normalisation off: 0..1.
        self.compare("clip_vit", model, CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                              do_normalize=False), tolerance=1e-2 / 255 * 1.01)

    def test_siglip_image_processor(self):
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=48, patch_size=16))
        self.compare("siglip", model, SiglipImageProcessorPil(size={"height": 48, "width": 48}))


if __name__ == "__main__":
    unittest.main()
