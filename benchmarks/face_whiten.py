"""What `model.whiten` does to a saved face run: verification on people never seen, without and with the whitening
fitted as training fits it (the run's training people of its store, unaugmented, flip-fused), at several shrinkages,
and the held-out people's verification (the area under their ROC decides whether a run keeps it).

    python benchmarks/face_whiten.py RUN STORE PAIRS ROOT [--shrink 0.3 1.0]

RUN a face run (trained with or without model.whiten; its own whitening is set aside), STORE the face store it was
trained on, PAIRS and ROOT the pairs file and image folder of the people never seen (danlu face pairs / verify).
docs/evidence/faces.md's whitening table comes from this script.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from danlu.data.datasets import load_dataset
from danlu.face.api import load_face_run
from danlu.face.verify import read_pairs
from danlu.tasks.verification import VerificationEval, scores
from danlu.models.face import within_class_whitening


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run"), p.add_argument("store"), p.add_argument("pairs"), p.add_argument("root")
    p.add_argument("--shrink", type=float, nargs="+", default=[0.3, 1.0])
    a = p.parse_args()
    run = load_face_run(a.run, "cpu")
    net, recipe = run.run.model, run.run.recipe
    net.set_whitening(None, None)  # embeddings as trained: run.embed_crops gives the unit embeddings
    listed, fold_of = read_pairs(a.pairs, a.root)
    unique = sorted({x for i, j, _ in listed for x in (i, j)})
    row = {x: k for k, x in enumerate(unique)}
    pa, pb = torch.tensor([row[i] for i, _, _ in listed]), torch.tensor([row[j] for _, j, _ in listed])
    same = np.array([s for _, _, s in listed])

    def unseen(e: torch.Tensor) -> float:  # LFW's 10-fold accuracy on the people never seen
        e = F.normalize(e, dim=1)
        return scores((e[pa] * e[pb]).sum(1).numpy(), same, folds=int(fold_of.max()) + 1,
                      fold_of=fold_of)["accuracy_mean"]

    train, held = load_dataset("store", root=a.store, split="identities", val_fraction=recipe.data.val_fraction,
                               split_seed=recipe.data.split_seed)
    t = run.embed_crops(torch.as_tensor(np.asarray(train.images)), 256)
    h = run.embed_crops(torch.as_tensor(np.asarray(held.images)), 256)
    ve = VerificationEval(torch.as_tensor(np.asarray(held.labels)), recipe.data.test_pairs, recipe.data.split_seed)

    def held_out(e: torch.Tensor) -> str:  # the ROC area decides whether training keeps it
        e = F.normalize(e, dim=1)
        r = scores((e[ve.a] * e[ve.b]).sum(1).numpy(), ve.same)
        return f"ROC area {r['roc_auc']:.4f} (accuracy {r['accuracy_mean']:.4f})"

    crops, _ = run.faces(unique)
    u = run.embed_crops(crops, 256)
    print(f"{a.run}: {len(train.classes)} training people, {len(held.classes)} held out; without whitening: unseen "
          f"{unseen(u):.3f}, held-out {held_out(h)}")
    for s in a.shrink:
        mean, matrix = within_class_whitening(t, torch.as_tensor(np.asarray(train.labels)), s)
        print(f"  shrink {s}: unseen {unseen((u - mean) @ matrix):.3f}, held-out {held_out((h - mean) @ matrix)}")


if __name__ == "__main__":
    main()
