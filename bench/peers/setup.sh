#!/usr/bin/env bash
# Puts each peer trainer in its own virtual environment, outside the project's (they pin other versions).
#
#   bash bench/peers/setup.sh KOHYA_SRC DIFFUSERS_SRC [VENV_ROOT]
#
# KOHYA_SRC: a checkout of github.com/kohya-ss/sd-scripts; DIFFUSERS_SRC: a checkout of github.com/huggingface/diffusers
# (its examples/text_to_image scripts need the library from the same checkout). VENV_ROOT defaults to ./peers-venv;
# it gets kohya/ and diffusers/. TORCH_SPEC (default torch==2.13.0, the engine's) is pinned in every install so that
# all sides run the same torch build; set it to your CUDA build's spec on a GPU machine.
set -euo pipefail
KOHYA_SRC=$(realpath "${1:?usage: setup.sh KOHYA_SRC DIFFUSERS_SRC [VENV_ROOT]}")
DIFFUSERS_SRC=$(realpath "${2:?usage: setup.sh KOHYA_SRC DIFFUSERS_SRC [VENV_ROOT]}")
VENV_ROOT=$(realpath -m "${3:-peers-venv}")
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3.11}
[[ -f "$KOHYA_SRC/train_network.py" ]] || { echo "no train_network.py in $KOHYA_SRC: give a sd-scripts checkout" >&2; exit 2; }
[[ -f "$DIFFUSERS_SRC/examples/text_to_image/train_text_to_image_lora.py" ]] ||
  { echo "no examples/text_to_image/train_text_to_image_lora.py in $DIFFUSERS_SRC: give a diffusers checkout" >&2; exit 2; }

# kohya: its own pins (transformers 4.x, diffusers 0.32, accelerate, ...), without the editable install of itself
# (train_network.py runs from the checkout, which puts library/ and networks/ on the path).
if [[ ! -x "$VENV_ROOT/kohya/bin/python" ]]; then $PY -m venv "$VENV_ROOT/kohya"; fi
grep -vE '^\s*(-e|#|$)' "$KOHYA_SRC/requirements.txt" > "$VENV_ROOT/kohya-requirements.txt"
"$VENV_ROOT/kohya/bin/pip" install -q "$TORCH_SPEC" -r "$VENV_ROOT/kohya-requirements.txt"

# diffusers example: the library from the same checkout (the script checks its version) and the example's requirements
if [[ ! -x "$VENV_ROOT/diffusers/bin/python" ]]; then $PY -m venv "$VENV_ROOT/diffusers"; fi
grep -vE '^\s*(torchvision|#|$)' "$DIFFUSERS_SRC/examples/text_to_image/requirements.txt" > "$VENV_ROOT/diffusers-requirements.txt"
"$VENV_ROOT/diffusers/bin/pip" install -q "$TORCH_SPEC" "$DIFFUSERS_SRC" -r "$VENV_ROOT/diffusers-requirements.txt"

# torchvision: both peers import torchvision.transforms for their image pipeline. The matching wheel is used where it
# imports beside this torch build; where it does not (a CPU torch with a CUDA-built torchvision), run.py puts the
# stand-in bench/peers/standins/ on the path instead (PIL/torch versions of the few transforms they use).
for v in kohya diffusers; do
  "$VENV_ROOT/$v/bin/pip" install -q --no-deps "${TORCHVISION_SPEC:-torchvision}" || true
  if "$VENV_ROOT/$v/bin/python" -c "import torchvision.transforms" 2>/dev/null; then echo "$v: torchvision imports";
  else "$VENV_ROOT/$v/bin/pip" uninstall -q -y torchvision || true; echo "$v: torchvision does not import here; run.py uses the stand-in"; fi
done
for v in kohya diffusers; do
  echo "$v: $("$VENV_ROOT/$v/bin/python" -c 'import torch, diffusers, transformers, accelerate; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)')"
done
