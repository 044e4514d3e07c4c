#!/usr/bin/env bash
# sha256 of what `onnxquant convert` writes for the digits demo (W8 and W4) and the ResNet-18-shaped model,
# with minmax, kl and laplace: run it before and after a refactor that must not change outputs.
#   bash tools/output_hashes.sh OUTDIR [ONNXQUANT]
set -euo pipefail
out=$(realpath -m "$1"); oq=${2:-onnxquant}; mkdir -p "$out"
cd "$(dirname "$0")/.."
[ -f "$out/r18.onnx" ] || python tools/make_resnet18.py -o "$out/r18.onnx" --calib "$out/r18calib.npz" --samples 16 >/dev/null
for m in minmax kl laplace; do
  "$oq" convert calib_data/digits/model.onnx --calib $m --calib-data calib_data/digits/calib.npz \
    -o "$out/digits.$m.onnx" --table-out "$out/digits.$m.json" >/dev/null
  "$oq" convert calib_data/digits/model.onnx --bits 4 --calib $m --calib-data calib_data/digits/calib.npz \
    -o "$out/digits4.$m.onnx" >/dev/null
  "$oq" convert "$out/r18.onnx" --calib $m --calib-data "$out/r18calib.npz" -o "$out/r18.$m.onnx" \
    --table-out "$out/r18.$m.json" >/dev/null
done
cd "$out" && sha256sum digits*.onnx r18.*.onnx ./*.json
