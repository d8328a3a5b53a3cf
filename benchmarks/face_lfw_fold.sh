#!/usr/bin/env bash
# LFW's protocol with training on LFW itself, people disjoint: verify fold K's 600 official pairs (as 10 folds of
# 30 + 30) with a model trained on every person with at least 2 images who appears in no pair of fold K (1,505 people
# and 8,243 images for fold 1), with the light face recipe and the README's commands.
#   bash benchmarks/face_lfw_fold.sh LFW_DIR OUT [K] [--set key=value ...]
# LFW_DIR: images/NAME/NAME_0001.jpg and the official pairs.txt (10 folds of 300 same + 300 different pairs).
# Prints the fold's accuracy (mean +- std over its 10 sub-folds) and the training time; OUT/verify.json has the rest.
set -eu
lfw=$(cd "$1" && pwd); out=$2; shift 2
k=1; if [ $# -gt 0 ] && [[ $1 != --* ]]; then k=$1; shift; fi
D=${DANLU:-danlu}; PY=${PYTHON:-python3}
mkdir -p "$out"; cd "$out"
"$PY" - "$lfw" "$k" <<'PY'
import os, sys
lfw, k = sys.argv[1], int(sys.argv[2])
lines = open(f"{lfw}/pairs.txt").read().splitlines()
fold = lines[1 + 600 * (k - 1): 1 + 600 * k]
names = {t for line in fold for t in line.split() if not t.isdigit()}
same, diff = fold[:300], fold[300:]  # 10 sub-folds of 30 + 30 in LFW's own layout
open("pairs.txt", "w").write("10\t30\n" + "".join("\n".join(same[30 * j:30 * j + 30] + diff[30 * j:30 * j + 30]) + "\n"
                                                 for j in range(10)))
for d in ("train", "test"):
    os.makedirs(d, exist_ok=True)
n = 0
for name in sorted(os.listdir(f"{lfw}/images")):
    src, where = f"{lfw}/images/{name}", None
    if name in names:
        where = "test"
    elif len(os.listdir(src)) >= 2:
        where, n = "train", n + 1
    if where and not os.path.lexists(f"{where}/{name}"):
        os.symlink(src, f"{where}/{name}")
print(f"fold {k}: {len(names)} people in its pairs, {n} training people")
PY
[ -f store/meta.json ] || $D face prepare train -o store --size 112 > prepare.log 2>&1
$D train face_arcface_light --out run --device "${DEVICE:-cpu}" --set data.root="$PWD/store" "$@" > train.log 2>&1
$D face verify run --pairs pairs.txt --root test --json verify.json > verify.log 2>&1
"$PY" - "$k" <<'PY'
import json, sys
v, s = json.load(open("verify.json")), json.load(open("run/summary.json"))
print(f"LFW fold {sys.argv[1]} (600 official pairs, people never seen in training): {v['accuracy_mean']:.3f} +- "
      f"{v['accuracy_std']:.3f}; {s.get('iterations')} iterations, {s.get('train_seconds', 0):.0f} s of training")
PY
