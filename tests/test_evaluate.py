"""The evaluator's protocols against open_clip's and against hand-computed values."""

import contextlib

import open_clip
import torch

from rankclip.eval_data import build_labeled_loader, load_eval_set
from rankclip.evaluate import Evaluator, ZeroShotTask, zero_shot_classifier
from rankclip.metrics import topk_correct
from rankclip.models import build_model

CPU = torch.device("cpu")


def test_zero_shot_agrees_with_open_clip(colour_data):
    torch.manual_seed(0)
    bundle = build_model("tiny-vit")
    model = bundle.model.eval()
    data = load_eval_set("ImageNet1K", colour_data["zeroshot"], bundle.val_transform)
    classes, templates = data.require_prompts()

    ours = zero_shot_classifier(model, bundle.tokenizer, classes, templates, CPU)
    theirs = open_clip.build_zero_shot_classifier(model, bundle.tokenizer, classes, templates, device=CPU)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    loader = build_labeled_loader(data.dataset, batch_size=16, num_workers=0, pin_memory=False)
    evaluator = Evaluator(device=CPU, autocast=contextlib.nullcontext, loss_fn=None, validation_loader=None,
                          tokenizer=bundle.tokenizer, logger=None)
    metrics = evaluator.zero_shot(model, ZeroShotTask("ImageNet1K", loader, classes, templates))
    with torch.no_grad():
        images, labels, _ = next(iter(build_labeled_loader(data.dataset, 64, 0, False)))
        predictions = (model.encode_image(images, normalize=True) @ theirs).argmax(dim=1)
    assert metrics["zeroshot_top1"] == (predictions == labels).float().mean().item()
    assert metrics["num_samples"] == 64 and metrics["num_classes"] == 4


def test_topk_counts_hits_and_caps_k_at_the_class_count():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.3, 0.5, 0.2]])
    labels = torch.tensor([0, 1, 0])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 3, 5: 3}
