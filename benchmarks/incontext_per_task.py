"""In-context segmentation per task: what each class's task predicts on its own, against the label map.

    python benchmarks/incontext_per_task.py -w WEIGHTS_FOLDER -d 502 --reference mniseg_tr003 \
        --queries mniseg_tr000 mniseg_tr007 [--foreground-centred]

One labelled case of ``-d`` is the reference (every class of its label map is a task); each query case (imagesTr,
with its labelsTr) is segmented in context. Per class: the ground-truth voxels, then the label map (a voxel goes
to the class with the highest sigmoid above 0.5; `mass segment`'s rule) and the class alone (its own sigmoid > 0.5)
as predicted voxels and Dice, and the highest sigmoid. A class alone that predicts many voxels at Dice 0 predicts
another structure (e.g. the other side). ``--foreground-centred`` crops the reference around its foreground's
centre instead of the label's (a check that the placement of the reference crop is not what fails).
"""
from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", required=True, help="a MASS pretraining output folder")
    parser.add_argument("-d", required=True, help="labelled dataset ID")
    parser.add_argument("--reference", required=True, help="case ID of the reference (imagesTr + labelsTr)")
    parser.add_argument("--queries", nargs="+", required=True, help="case IDs to segment (imagesTr + labelsTr)")
    parser.add_argument("--foreground-centred", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import torch

    from mass_nnu.adapter import inference
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.incontext.common import load_pretrained
    from mass_nnu.incontext.segment import foreground_box, load_reference, predict_logits, to_label_map
    from mass_nnu.model import references
    from mass_nnu.workspace import configure_environment

    configure_environment(quiet=True)
    if args.foreground_centred:
        def centred(reference, label, patch_size):
            start = [(b.start + b.stop) // 2 - p // 2 for b, p in zip(foreground_box(reference.data, patch_size),
                                                                      patch_size)]
            mask = (reference.seg == label)[None].astype(np.float32)
            return (references.crop_padded(reference.data, start, patch_size),
                    references.crop_padded(mask, start, patch_size))
        references.reference_crop = centred

    dataset = Dataset.resolve(args.d)
    names = {int(v): k for k, v in dataset.dataset_json()["labels"].items() if not isinstance(v, list)}
    pretrained = load_pretrained(args.w, device="cpu")
    labels_dir = dataset.raw / "labelsTr"
    ending = dataset.file_ending
    reference = load_reference(dataset.image_file(args.reference), labels_dir / f"{args.reference}{ending}",
                               pretrained, None)
    tokens = references.encode_tasks(pretrained.model, pretrained.patch_size, [reference], reference.labels)
    for query in args.queries:
        data, properties = inference.read_image([dataset.image_file(query)], pretrained.plans)
        data, _, properties = inference.preprocess(data, None, properties, pretrained.plans)
        truth = inference.read_segmentation(labels_dir / f"{query}{ending}", pretrained.plans)[0]
        logits = predict_logits(pretrained, tokens, data, 0.5, foreground_box(data, pretrained.patch_size))
        label_map = to_label_map(logits, properties, pretrained, reference.labels, True)
        print(f"\nquery {query}, reference {args.reference}")
        print(f"{'class':24s}{'truth':>8s}{'map':>8s}{'Dice':>7s}{'alone':>8s}{'Dice':>7s}{'max sigmoid':>13s}")
        for k, label in enumerate(reference.labels):
            alone = to_label_map(logits[k:k + 1], properties, pretrained, [label], True)
            print(f"{names[label]:24s}{int((truth == label).sum()):8d}{int((label_map == label).sum()):8d}"
                  f"{inference.dice(truth, label_map, label):7.3f}{int((alone == label).sum()):8d}"
                  f"{inference.dice(truth, alone, label):7.3f}{float(torch.sigmoid(logits[k]).max()):13.2f}")


if __name__ == "__main__":
    main()
