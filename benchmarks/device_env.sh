# Source on the GPU test machine (no network) from the repo root, after carrying `.whl` (pydantic & co.,
# see ../shared/GPU.md) and `.devkernels` (../shared/tools/device-kernels.sh fa3):
#   source benchmarks/device_env.sh
# Installs the carried wheels into /tmp/site, registers weavelm's entry points there without a build (so the
# plugin registry finds the built-ins), and loads vLLM's FA3 op for the flash_attn backend when it was carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'PY'
import os, tomllib
d = tomllib.load(open("pyproject.toml", "rb"))
di = "/tmp/site/weavelm-0.1.0.dist-info"
os.makedirs(di, exist_ok=True)
open(di + "/METADATA", "w").write("Metadata-Version: 2.1\nName: weavelm\nVersion: 0.1.0\n")
eps = d["project"]["entry-points"]["weavelm"]
open(di + "/entry_points.txt", "w").write("[weavelm]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
PY
if [ -f .devkernels/_vllm_fa3_C.abi3.so.xz ]; then
  # where the flash_attn backend looks when `kernels.fa3_lib` is not set: fa3/ under the cache root
  python3 -c "import lzma,shutil,weavelm.utils as u;d=u.cache_root()/'fa3';d.mkdir(parents=True,exist_ok=True);shutil.copyfileobj(lzma.open('.devkernels/_vllm_fa3_C.abi3.so.xz'),open(d/'_vllm_fa3_C.abi3.so','wb'))"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
