"""Run in a clean process (no slip-pipeline import, cwd outside the repo): load an exported folder with open_clip
only and score an ImageFolder with CLIP_benchmark's zero-shot code; optionally embed given tensors.

CLIP_benchmark 1.6.2's `zeroshot_classification.evaluate` ends in its `accuracy`, which calls float() on a
1-element array, an error under NumPy >= 2.3; so the model-facing part is CLIP_benchmark's own
(`zero_shot_classifier`, `run_classification`) and the scores are evaluate()'s formulas: top-k from the logits,
mean per-class recall with sklearn's balanced_accuracy_score.

usage: open_clip_zeroshot.py EXPORT_DIR IMAGE_FOLDER CLASSNAMES_JSON TEMPLATES_JSON OUT_JSON [TENSORS_PT]
       (IMAGE_FOLDER may be "-" to only embed TENSORS_PT = {"images": [N,3,H,W], "texts": [str]})
"""
import json
import sys

import open_clip
import torch
import torchvision
from clip_benchmark.metrics import zeroshot_classification
from sklearn.metrics import balanced_accuracy_score

OURS = ("slip_core", "datasets", "evaluation", "flows", "tests")


def main(export_dir, image_folder, classnames_json, templates_json, out_json, tensors=None):
    torch.set_num_threads(1)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    out = {"visual": type(model.visual).__name__}
    if hasattr(model.visual, "trunk") and hasattr(model.visual.trunk, "blocks"):
        out["heads"] = sorted({b.attn.num_heads for b in model.visual.trunk.blocks})
    if image_folder != "-":
        ds = torchvision.datasets.ImageFolder(image_folder, transform=preprocess)
        loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=False)
        with open(classnames_json) as f:
            classnames = json.load(f)
        with open(templates_json) as f:
            templates = json.load(f)
        classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu",
                                                                  amp=False)
        logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
        top5 = logits.topk(5, 1, True, True)[1]
        out["acc1"] = (logits.argmax(1) == target).float().mean().item()
        out["acc5"] = (top5 == target[:, None]).any(1).float().mean().item()
        out["mean_per_class_recall"] = float(balanced_accuracy_score(target, logits.argmax(1)))
        out["num_samples"] = len(ds)
    if tensors:
        t = torch.load(tensors, weights_only=True)
        with torch.no_grad():
            out["image_embed"] = model.encode_image(t["images"]).tolist()
            out["text_embed"] = model.encode_text(tokenizer(t["texts"])).tolist()
    out["imported_ours"] = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in OURS})
    with open(out_json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
