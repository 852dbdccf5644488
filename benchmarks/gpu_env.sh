# Sourced by the GPU scripts: put the carried wheelhouse (.gpu-wheels, Axolotl and what the
# GPU machine lacks) on the path, offline and untracked.
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu-wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
