#!/usr/bin/env bash
# model.init from a danlu run trained on another real set, against random initialization, fine-tuned on the same
# photos with the same budget (resnet18_finetune without ImageNet weights), 3 seeds each.
#   bash benchmarks/finetune_init.sh SOURCE_CLASS_FOLDERS TARGET_PHOTOS OUT
# SOURCE_CLASS_FOLDERS: e.g. CIFAR-10 images as class folders (trained from scratch at 64 px, 8 epochs);
# TARGET_PHOTOS: e.g. the PyTorch tutorial's hymenoptera_data (train/ and val/ class folders).
set -eu
src=$1; target=$2; out=$3
D=${DANLU:-danlu}
mkdir -p "$out"
[ -f "$out/source/summary.json" ] || $D train resnet18_finetune --set data.root="$src" --set model.pretrained=false \
  --set data.size=64 --set data.val_fraction=0.1 --set optim.lr=0.05 --set optim.head_lr_mult=1 --set run.epochs=8 \
  --set 'augment.resized_crop=[0.35,1]' --device cpu --out "$out/source" > "$out/source.log" 2>&1
for seed in 0 1 2; do
  for how in init random; do
    extra=(); [ "$how" = init ] && extra=(--set "model.init=$out/source")
    $D train resnet18_finetune --set data.root="$target" --set model.pretrained=false "${extra[@]}" \
      --set run.seed=$seed --device cpu --out "$out/${how}_$seed" > "$out/${how}_$seed.log" 2>&1
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], round(s['test_accuracy'], 4))" \
      "$out/${how}_$seed/summary.json" "$how" "$seed"
  done
done
