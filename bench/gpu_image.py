"""The GPU machine's Python image, as this project needs to know it: what to carry there and what a rehearsal holds.

    python -m bench.gpu_image carry                 # name==version of every wheel .whl/ must hold (one per line)
    python -m bench.gpu_image farm DIR              # DIR: links to this machine's copies of the image's packages

IMAGE lists the packages the lent H200 machine's image ('cuda', /opt/torch/.venv/bin/python3, Python 3.12.3, torch
2.11) holds, as the device tool's KINDS.md read them on 2026-11-17. What the GPU check imports beyond them is
derived, not typed: the requirement closure of deepspeed (for the engine and its launcher) on this machine, minus
the image, plus timm at the version the project pins (the image's timm is of a version nobody read). MLflow and DVC
are not carried: bench/gpu.sh runs with RSB_TRACKING=off and no stage imports mlflow at import time (the rehearsal,
which holds no mlflow, shows it).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

IMAGE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()
)
ROOTS = ("deepspeed",)  # what the GPU check needs beyond the image
# carried even though the image has one: timm at the version the project pins; typing-extensions because the carried
# pydantic and pydantic-core require >= 4.14.1 and the image's version is not known (a pure-Python wheel, 45 KB)
PINNED = ("timm", "typing-extensions")
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requires(dist: metadata.Distribution) -> list[str]:
    """The distribution's requirements that apply on the GPU machine's Python (markers evaluated; no extras)."""
    from packaging.requirements import Requirement

    out = []
    for line in dist.requires or []:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate(TARGET):
            out.append(norm(r.name))
    return out


def carry() -> list[str]:
    """name==version (as installed here) of each distribution the check imports that the image lacks, plus PINNED."""
    seen, todo = set(), [norm(r) for r in ROOTS]
    while todo:
        name = todo.pop()
        if name in seen or name in IMAGE:
            continue
        seen.add(name)
        todo += requires(metadata.distribution(name))
    return sorted(f"{metadata.distribution(n).metadata['Name']}=={metadata.version(n)}" for n in seen | set(PINNED))


def farm(out: Path) -> list[str]:
    """Links in `out` to this machine's installed copies of every image package that is installed here: a folder
    a fresh virtual environment can put on its path (one .pth line) to hold what the image holds, and nothing
    else: the image's packages and what their versions here require (huggingface_hub here needs httpx2, which the
    image's older one does not), never what is carried (deepspeed, pydantic, hjson, ...) nor mlflow or dvc.
    Returns the distributions linked."""
    out.mkdir(parents=True)
    carried = {norm(c.split("==")[0]) for c in carry()}
    installed = {norm(d.metadata["Name"]) for d in metadata.distributions()}
    held, todo = set(), sorted(IMAGE & installed)  # the image's packages, with what their versions here need
    while todo:
        name = todo.pop()
        if name in held or name in carried or name not in installed:
            continue
        held.add(name)
        todo += requires(metadata.distribution(name))
    linked = []
    for dist in metadata.distributions():
        if norm(dist.metadata["Name"]) not in held or not dist.files:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (out / top).exists() and top != "__pycache__":
                (out / top).symlink_to(src)
        linked.append(dist.metadata["Name"])
    return sorted(linked)


if __name__ == "__main__":
    if sys.argv[1:2] == ["carry"]:
        print("\n".join(carry()))
    elif sys.argv[1:2] == ["farm"] and len(sys.argv) == 3:
        print(f"{len(farm(Path(sys.argv[2])))} image packages linked into {sys.argv[2]}")
    else:
        sys.exit("usage: python -m bench.gpu_image carry | farm DIR")
